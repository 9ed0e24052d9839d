"""Large zeroed buffers: zeros of the right type and size, freed with their tensor, and
on huge pages where the kernel offers them for ``madvise``."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from lightning_fed.privacy.buffers import HUGE_PAGE, zeros

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def _rss_mib() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 >> 20


@pytest.mark.parametrize(
    ("n", "dtype"),
    [(0, torch.int64), (7, torch.uint8), (HUGE_PAGE, torch.uint8), (3 << 20, torch.int64)],
)
def test_zeros_are_zeros_of_the_asked_type(n: int, dtype: torch.dtype) -> None:
    t = zeros(n, dtype)
    assert t.dtype == dtype and tuple(t.shape) == (n,) and t.is_contiguous()
    assert not t.any()
    t.fill_(3)  # writable, every element
    assert int(t.sum()) == 3 * n


def test_large_buffers_are_freed_with_their_tensor() -> None:
    """16 buffers of 64 MiB, each dropped before the next: memory stays flat."""
    before = _rss_mib()
    for _ in range(16):
        t = zeros(8 << 20, torch.int64)
        t[::512].fill_(1)  # touch every page
        view = t[10:20]
        del t, view
        gc.collect()
    assert _rss_mib() - before < 512


@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text(),
    reason="the kernel offers no transparent huge pages",
)
def test_large_buffers_sit_on_huge_pages() -> None:
    before = _anon_huge_kib()
    t = zeros(16 << 20, torch.int64)  # 128 MiB
    t[::512].fill_(1)
    assert t.data_ptr() % HUGE_PAGE == 0
    assert _anon_huge_kib() - before >= 64 << 10  # at least half of it on 2 MiB pages
    del t


def test_a_given_buffer_comes_back_zeroed_for_its_size_only() -> None:
    """What a round gives back serves the next take of the same size and dtype, zeroed;
    views, small tensors and other sizes are not kept."""
    from lightning_fed.privacy.buffers import Recycler

    kept = Recycler()
    first = kept.take(1 << 20, torch.int64)
    first.fill_(7)
    kept.give(first)
    again = kept.take(1 << 20, torch.int64)
    assert again.data_ptr() == first.data_ptr() and not again.any()
    assert kept.take(1 << 20, torch.int64).data_ptr() != first.data_ptr()  # taken once
    kept.give(again)
    assert kept.take(1 << 19, torch.int64).data_ptr() != again.data_ptr()  # other size
    assert kept.take(1 << 20, torch.int32).data_ptr() != again.data_ptr()  # other dtype
    view = zeros(1 << 21, torch.int64)[1:]
    small = torch.zeros(10, dtype=torch.int64)
    for t in (view, small):
        kept.give(t)
        assert kept.take(t.numel(), t.dtype).data_ptr() != t.data_ptr()
    kept.clear()
    assert kept.take(1 << 20, torch.int64).data_ptr() != again.data_ptr()
