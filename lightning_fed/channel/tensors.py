"""Named tensors to and from safetensors blobs: no pickle ever crosses the channel.

The blob format is safetensors (an 8-byte little-endian header length, a JSON
header of dtype, shape and data offsets per tensor, then the raw bytes), written
and read here directly so that:

- sending never builds a second copy of the model: the header and each tensor's
  own memory are written out as they are, while a second thread hashes them;
- receiving reads the blob once into one buffer and hands out tensors that are
  views into it (zero-copy), after verifying the SHA-256 the sender signed;
- every malformed header, offset or size is reported as a plain ``ValueError``
  with the reason, never as a crash inside a native library.

Blobs written here load with ``safetensors.torch.load`` and vice versa.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import mmap
import struct
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_fed.channel.names import validate_tensor_name

if TYPE_CHECKING:  # torch is imported on first use: processes that only pass JSON start fast
    import torch

CHUNK_BYTES = 4 << 20
MAX_HEADER_BYTES = 100 << 20
_DTYPE_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


@functools.cache
def _dtype_tables() -> tuple[dict[Any, str], dict[str, Any]]:
    import torch

    to_name = {}
    for attr, code in _DTYPE_NAMES.items():
        dtype = getattr(torch, attr, None)
        if dtype is not None:
            to_name[dtype] = code
    return to_name, {code: dtype for dtype, code in to_name.items()}


@dataclass(frozen=True)
class EncodedTensors:
    """A safetensors blob as a list of byte chunks (header first), not yet joined.

    ``chunks`` are views into the tensors' own memory; ``keepalive`` holds the
    tensors so that the views stay valid.
    """

    chunks: list[memoryview]
    size: int
    keepalive: tuple[Any, ...]

    def to_bytes(self) -> bytes:
        """The whole blob as one bytes object (one copy)."""
        return b"".join(self.chunks)


def _raw_view(t: torch.Tensor) -> memoryview:
    import torch

    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return flat.numpy().data


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> EncodedTensors:
    """Lay out named tensors as a safetensors blob without copying their data.

    Tensors are detached, moved to CPU and made contiguous; larger element types
    come first so that every tensor's data is aligned in the blob.

    Raises:
        TypeError: if a value is not a dense tensor or has an unsupported dtype.
        InvalidNameError: if a name is empty or has control characters.
    """
    import torch

    to_name, _ = _dtype_tables()
    plain: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        validate_tensor_name(name)
        if name == "__metadata__":
            raise TypeError("'__metadata__' is reserved by the safetensors format")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"tensor {name!r} is a {type(value).__name__}, not a torch.Tensor; "
                "hint: put plain numbers in the message body instead"
            )
        if value.layout != torch.strided or value.dtype not in to_name:
            raise TypeError(
                f"tensor {name!r} has layout {value.layout} and dtype {value.dtype}; only dense "
                f"tensors of {', '.join(sorted(map(str, to_name)))} can be sent"
            )
        plain[name] = value.detach().cpu().contiguous()
    order = sorted(plain, key=lambda n: (-plain[n].element_size(), n))
    header: dict[str, Any] = {}
    offset = 0
    for name in order:
        t = plain[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": to_name[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    chunks = [memoryview(struct.pack("<Q", len(text)) + text)]
    for name in order:
        t = plain[name]
        if t.numel():
            raw = _raw_view(t)
            chunks.extend(raw[i : i + CHUNK_BYTES] for i in range(0, len(raw), CHUNK_BYTES))
    return EncodedTensors(chunks, 8 + len(text) + offset, tuple(plain.values()))


#: Below this many bytes, :class:`StreamingHash` hashes on the caller's thread.
INLINE_BYTES = 1 << 20


class StreamingHash:
    """SHA-256 computed on a helper thread while the caller moves the same bytes.

    ``hashlib`` releases the GIL on large buffers, so hashing overlaps with disk
    or network I/O on another core. Chunks are hashed in the order they are fed.
    Until a chunk of :data:`INLINE_BYTES` or more comes, chunks are hashed at once
    on the caller's thread: for small messages a thread costs more than it saves.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future[None] | None = None

    def _submit(self, chunks: list[memoryview | bytes]) -> None:
        if self._pool is None and sum(memoryview(c).nbytes for c in chunks) < INLINE_BYTES:
            self._update_all(chunks)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lightning-fed-sha256")
        self._last = self._pool.submit(self._update_all, chunks)

    def feed(self, chunk: memoryview | bytes) -> None:
        """Queue ``chunk`` for hashing (it must stay unchanged until :meth:`hexdigest`)."""
        self._submit([chunk])

    def feed_all(self, chunks: Iterable[memoryview | bytes]) -> None:
        """Queue all ``chunks`` as one task."""
        self._submit(list(chunks))

    def _update_all(self, chunks: list[memoryview | bytes]) -> None:
        for chunk in chunks:
            self._hash.update(chunk)

    def hexdigest(self) -> str:
        """Wait for every queued chunk and return the hex digest."""
        try:
            if self._last is not None:
                self._last.result()
        finally:
            self.close()
        return self._hash.hexdigest()

    def close(self) -> None:
        """Stop the helper thread (after the queued chunks); safe to call twice."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> StreamingHash:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def allocate_buffer(size: int) -> bytearray | mmap.mmap:
    """A writable buffer of ``size`` bytes to read a blob into.

    Large buffers are anonymous memory maps backed by transparent huge pages where
    the OS offers them: filling 100 MB takes a quarter of the time it takes to
    fault in the 4 KiB pages of a ``bytearray``.
    """
    if size < (1 << 20):
        return bytearray(size)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):  # THP disabled: ordinary pages are fine
            buf.madvise(advice)
    return buf


def sha256_hex(data: bytes | memoryview) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _is_index(value: Any) -> bool:
    """A non-negative int that fits in 63 bits (bools are not ints here)."""
    return type(value) is int and 0 <= value < (1 << 63)


def _check_entry(
    name: str, entry: Any, data_len: int, from_name: dict[str, Any]
) -> tuple[Any, list[int], int, int]:
    if not isinstance(entry, dict):
        raise ValueError(f"header entry {name!r} is not an object")
    code = entry.get("dtype")
    dtype = from_name.get(code) if isinstance(code, str) else None
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise ValueError(f"tensor {name!r} has unknown dtype {code!r}")
    if not (isinstance(shape, list) and all(_is_index(d) for d in shape)):
        raise ValueError(f"tensor {name!r} has a malformed shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_index(o) for o in offsets)
        and offsets[0] <= offsets[1] <= data_len
    ):
        raise ValueError(f"tensor {name!r} has data offsets {offsets!r} outside the blob")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = dtype.itemsize
    if offsets[1] - offsets[0] != numel * itemsize:
        raise ValueError(
            f"tensor {name!r} declares shape {shape} of {dtype} ({numel * itemsize} bytes) "
            f"but {offsets[1] - offsets[0]} bytes of data"
        )
    return dtype, shape, offsets[0], offsets[1]


def decode_tensors(buffer: bytearray | mmap.mmap) -> dict[str, torch.Tensor]:
    """Tensors that are views into ``buffer`` (a safetensors blob).

    Raises:
        ValueError: naming what is malformed (header, dtype, shape, offsets, gaps).
    """
    import torch

    _, from_name = _dtype_tables()
    if len(buffer) < 8:
        raise ValueError(f"not a valid safetensors blob ({len(buffer)} bytes is too short)")
    (n,) = struct.unpack_from("<Q", buffer, 0)
    if n > min(MAX_HEADER_BYTES, len(buffer) - 8):
        raise ValueError(f"not a valid safetensors blob (header length {n} is impossible)")
    try:
        header = json.loads(bytes(buffer[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not a valid safetensors blob (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise ValueError("not a valid safetensors blob (header is not an object)")
    header.pop("__metadata__", None)
    start = 8 + n
    data_len = len(buffer) - start
    entries = []
    for name, entry in header.items():
        validate_tensor_name(name)
        entries.append((name, *_check_entry(name, entry, data_len, from_name)))
    covered = 0
    for _name, _dtype, _shape, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != covered:
            raise ValueError("not a valid safetensors blob (tensor data overlaps or leaves gaps)")
        covered = end
    if covered != data_len:
        raise ValueError(f"not a valid safetensors blob ({data_len - covered} trailing bytes)")
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, begin, end in entries:
        if begin == end:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        offset = start + begin
        if offset % dtype.itemsize:  # unaligned data from a foreign writer: copy it
            raw = torch.frombuffer(bytearray(buffer[offset : start + end]), dtype=dtype)
        else:
            raw = torch.frombuffer(
                buffer, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=offset
            )
        t = raw.reshape(shape)
        if dtype == torch.bool and bool((t.view(torch.uint8) > 1).any()):
            raise ValueError(f"tensor {name!r} of dtype bool holds bytes other than 0 and 1")
        out[name] = t
    return out
