"""Large zeroed buffers on transparent huge pages.

Secure aggregation makes a few vectors as large as the model every round (the masks a
client expands ahead, the packed bytes it sends, the aggregator's sum). On a 100 MB
model each is hundreds of megabytes of fresh memory, and touching it the first time
costs one page fault per 4 KiB: on a virtual machine that took longer than the
arithmetic done on it (about 80 ms per 200 MB against 20 ms on 2 MiB pages here).
:func:`zeros` maps such buffers privately and asks the kernel for huge pages
(``MADV_HUGEPAGE``: honoured where transparent huge pages are ``madvise`` or
``always``, ignored otherwise); the kernel zeroes them. Elsewhere (small buffers, no
``madvise``: macOS, Windows) it is :func:`torch.zeros`.

:data:`RECYCLED` keeps such a buffer once a round is done with it, for the next round
of the same size: a client's expanded masks and the aggregator's sum exist every
round, and filling kept memory with zeros costs a fraction of faulting in fresh memory.
A party holds one of each between rounds (the client's is twice a float32 model's
size and would be made again during the next round's training anyway).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading

import torch

#: The huge-page size the buffers are aligned to (x86-64 and arm64 with 4 KiB pages).
HUGE_PAGE = 2 << 20
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)
_PRIVATE = getattr(mmap, "MAP_PRIVATE", None)
_ANONYMOUS = getattr(mmap, "MAP_ANONYMOUS", None)


def zeros(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous 1-D tensor of ``n`` zeros of ``dtype``, on huge pages where the
    platform offers them (buffers of at least :data:`HUGE_PAGE` bytes), freed with the
    tensor."""
    size = n * torch.empty((), dtype=dtype).element_size()
    if size < HUGE_PAGE or _ADVICE is None or _PRIVATE is None or _ANONYMOUS is None:
        return torch.zeros(n, dtype=dtype)
    # Private and anonymous (shared anonymous memory is shmem, which has its own
    # setting), one huge page of slack so that the tensor can start on a boundary.
    buf = mmap.mmap(-1, size + HUGE_PAGE, flags=_PRIVATE | _ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    offset = (-address) % HUGE_PAGE
    with contextlib.suppress(OSError):  # no transparent huge pages: small ones, still zeros
        buf.madvise(_ADVICE, offset, size)
    # The tensor holds the mapping (through the buffer protocol) until it is freed.
    return torch.frombuffer(buf, dtype=dtype, count=n, offset=offset)


class Recycler:
    """Large 1-D buffers kept for reuse: one per size and dtype, thread-safe."""

    def __init__(self) -> None:
        self._kept: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._lock = threading.Lock()

    def take(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """``n`` zeros of ``dtype``: the kept buffer of that size, zeroed, if there is
        one (it is no longer kept), else :func:`zeros`."""
        with self._lock:
            kept = self._kept.pop((n, dtype), None)
        return zeros(n, dtype) if kept is None else kept.zero_()

    def give(self, buffer: torch.Tensor) -> None:
        """Keep ``buffer`` (a contiguous 1-D tensor of at least :data:`HUGE_PAGE` bytes
        that nothing else uses any more) for the next :meth:`take` of its size; smaller
        or other tensors are left to be freed."""
        if (
            buffer.dim() == 1
            and buffer.is_contiguous()
            and buffer.storage_offset() == 0
            and buffer.numel() * buffer.element_size() >= HUGE_PAGE
        ):
            with self._lock:
                self._kept[(buffer.numel(), buffer.dtype)] = buffer

    def clear(self) -> None:
        """Free every kept buffer."""
        with self._lock:
            self._kept.clear()


#: The process's kept buffers (see the module's docstring).
RECYCLED = Recycler()
