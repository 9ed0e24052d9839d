"""A round's updates kept on local disk, read back one chunk of one tensor at a time.

Robust statistics (median, trimmed mean, Krum) need every client's value of every
coordinate, not a running sum. Holding every update in memory costs ``clients x
model``; instead each update is written to a file as it arrives (then dropped from
memory), and the statistic reads the same slice of one tensor from every client's
file, so its memory is the output plus ``clients x chunk`` values.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from lightning_fed.algorithms.base import AlgorithmError, ClientUpdate, RoundAggregate, Statistic

#: Elements of one tensor read per client at a time (512 KiB of float64 per client): the
#: temporaries of a chunk (raw bytes, float64 values, a sort's values and indices) stay
#: a few MiB per client, small beside the model.
CHUNK = 1 << 16


class UpdateSpool:
    """Updates written to a private temporary folder; removed by :meth:`close`.

    Tensors are stored in their own dtype (every update has the same dtypes: the
    aggregator checks them before anything is folded) and read back as float64.

    Args:
        folder: where to make the temporary folder (default: the system's, honouring
            ``TMPDIR``).
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="lightning-fed-spool-", dir=folder))
        self.senders: list[str] = []
        self.samples: list[int] = []
        self._files: list[Path] = []
        self._offsets: list[dict[str, int]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}

    def __len__(self) -> int:
        return len(self._files)

    def add(self, sender: str, tensors: Mapping[str, torch.Tensor], num_samples: int) -> None:
        """Write one update to disk; keeps no reference to ``tensors``."""
        if self._files and set(tensors) != set(self.shapes):
            raise ValueError("every update must have the same tensor names")
        for name, t in tensors.items():
            shape = self.shapes.get(name, tuple(t.shape))
            dtype = self.dtypes.get(name, t.dtype)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"{name}: {tuple(t.shape)} {t.dtype} differs from the first update's "
                    f"{shape} {dtype}"
                )
        path = self._dir / f"{len(self._files)}.bin"
        offsets, offset = {}, 0
        with open(path, "wb") as out:
            for name in sorted(tensors):
                t = tensors[name].detach().cpu().contiguous()
                self.shapes.setdefault(name, tuple(t.shape))
                self.dtypes.setdefault(name, t.dtype)
                raw = t.reshape(-1).view(torch.uint8).numpy()  # no copy
                out.write(raw.data)
                offsets[name] = offset
                offset += raw.nbytes
        self._files.append(path)
        self._offsets.append(offsets)
        self.senders.append(sender)
        self.samples.append(num_samples)

    def merge(self, other: UpdateSpool) -> None:
        """Take over another spool's updates (their files move into this folder)."""
        if self._files and other._files and set(other.shapes) != set(self.shapes):
            raise ValueError("every update must have the same tensor names")
        for i, path in enumerate(other._files):
            moved = self._dir / f"{len(self._files)}.bin"
            shutil.move(path, moved)
            self._files.append(moved)
            self._offsets.append(other._offsets[i])
            self.senders.append(other.senders[i])
            self.samples.append(other.samples[i])
        for name, shape in other.shapes.items():
            self.shapes.setdefault(name, shape)
            self.dtypes.setdefault(name, other.dtypes[name])
        other._files, other._offsets, other.senders, other.samples = [], [], [], []

    def chunks(self, name: str, chunk: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, values)`` over tensor ``name``: ``values`` is ``clients x n`` float64.

        ``chunk`` elements per client at a time (default :data:`CHUNK`); ``values`` is
        new for every chunk; the files stay open only while iterating.
        """
        chunk = CHUNK if chunk is None else chunk
        numel = math.prod(self.shapes[name])
        dtype = self.dtypes[name]
        item = torch.empty((), dtype=dtype).element_size()
        raw = np.empty((len(self._files), min(chunk, max(numel, 1)) * item), dtype=np.uint8)
        handles = [open(p, "rb") for p in self._files]  # noqa: SIM115 - closed below
        try:
            for start in range(0, numel, chunk):
                n = min(chunk, numel - start)
                for row, handle in enumerate(handles):
                    view = raw[row, : n * item].data
                    at = self._offsets[row][name] + start * item
                    if os.preadv(handle.fileno(), [view], at) != n * item:
                        raise OSError(f"spool file {self._files[row]} is truncated")
                values = torch.from_numpy(raw[:, : n * item]).view(dtype)
                yield start, values.to(torch.float64)
        finally:
            for handle in handles:
                handle.close()

    def close(self) -> None:
        """Delete the folder and every update in it."""
        shutil.rmtree(self._dir, ignore_errors=True)
        self._files, self._offsets = [], []

    def __del__(self) -> None:
        self.close()


def cast_back(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float64 result in a tensor's own dtype (integers rounded)."""
    if not (dtype.is_floating_point or dtype.is_complex):
        values = values.round()
    return values.to(dtype)


class SpooledStatistic(Statistic):
    """A statistic that needs every update: spools them, then reduces chunk by chunk.

    Subclasses implement :meth:`reduce`. Extras are not supported: robust statistics
    fold the model only.
    """

    def __init__(self) -> None:
        self.spool = UpdateSpool()

    def add(self, update: ClientUpdate) -> None:
        if update.extras:
            raise AlgorithmError(f"{type(self).__name__} folds model tensors only, not extras")
        self.spool.add(update.sender, update.tensors, update.num_samples)

    def merge(self, other: Statistic) -> None:
        if not isinstance(other, SpooledStatistic):
            raise TypeError(f"cannot merge a {type(other).__name__} into {type(self).__name__}")
        self.spool.merge(other.spool)

    def result(self) -> RoundAggregate:
        try:
            if not len(self.spool):
                raise ValueError("no update was added, so there is nothing to aggregate")
            mean = self.reduce(self.spool)
            return RoundAggregate(mean, {}, len(self.spool), float(sum(self.spool.samples)))
        finally:
            self.spool.close()

    def reduce(self, spool: UpdateSpool) -> dict[str, torch.Tensor]:
        """The aggregate of the spooled updates (see :meth:`coordinatewise`)."""
        raise NotImplementedError

    @staticmethod
    def coordinatewise(
        spool: UpdateSpool, fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Apply ``fn`` (``clients x n`` float64 -> ``n``) over every tensor, chunk by chunk."""
        out = {}
        for name, shape in spool.shapes.items():
            dtype = spool.dtypes[name]
            result = torch.empty(math.prod(shape), dtype=dtype)
            for start, values in spool.chunks(name):
                result[start : start + values.shape[1]] = cast_back(fn(values), dtype)
            out[name] = result.reshape(shape)
        return out


def check_finite(values: torch.Tensor) -> None:
    """Robust statistics refuse NaN/Inf: they would pass through a sort silently."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError("an update holds NaN or Inf; the aggregator rejects such updates")
