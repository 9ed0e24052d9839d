"""Krum and multi-Krum: keep the updates closest to their neighbours."""

from __future__ import annotations

import torch

from lightning_fed.algorithms.base import (
    Algorithm,
    AlgorithmError,
    ModelSpec,
    Statistic,
)
from lightning_fed.algorithms.spool import SpooledStatistic, UpdateSpool, cast_back, check_finite
from lightning_fed.errors import SettingError


def squared_distances(values: torch.Tensor) -> torch.Tensor:
    """``clients x clients`` squared Euclidean distances between the rows of ``values``."""
    check_finite(values)
    norms = values.square().sum(dim=1)
    gram = values @ values.T
    return (norms[:, None] + norms[None, :] - 2 * gram).clamp_(min=0)


def krum_scores(distances: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Each update's score: the sum of its squared distances to its ``n - f - 2``
    nearest other updates (Blanchard et al. 2017)."""
    n = distances.shape[0]
    neighbours = n - byzantine - 2
    if neighbours < 1:
        raise AlgorithmError(
            f"Krum with byzantine={byzantine} needs at least {byzantine + 3} updates, got {n}"
        )
    others = distances.masked_fill(torch.eye(n, dtype=torch.bool), float("inf"))
    return others.sort(dim=1).values[:, :neighbours].sum(dim=1)


def krum_select(distances: torch.Tensor, byzantine: int, select: int) -> list[int]:
    """The indices of the ``select`` lowest scores; ties go to the lower index."""
    scores = krum_scores(distances, byzantine)
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[:select])


class _KrumStatistic(SpooledStatistic):
    def __init__(self, byzantine: int, select: int) -> None:
        super().__init__()
        self.byzantine, self.select = byzantine, select
        self.chosen: list[str] = []

    def reduce(self, spool: UpdateSpool) -> dict[str, torch.Tensor]:
        k = len(spool)
        distances = torch.zeros(k, k, dtype=torch.float64)
        for name in spool.shapes:  # pass 1: pairwise distances over the whole model
            for _, values in spool.chunks(name):
                distances += squared_distances(values)
        keep = krum_select(distances, self.byzantine, min(self.select, k))
        self.chosen = [spool.senders[i] for i in keep]
        weights = torch.tensor([float(spool.samples[i]) for i in keep], dtype=torch.float64)
        weights /= weights.sum()
        out = {}
        for name, shape in spool.shapes.items():  # pass 2: the chosen ones' weighted mean
            dtype = spool.dtypes[name]
            result = torch.empty(torch.Size(shape).numel(), dtype=dtype)
            for start, values in spool.chunks(name):
                mean = weights @ values[keep]
                result[start : start + values.shape[1]] = cast_back(mean, dtype)
            out[name] = result.reshape(shape)
        return out


class Krum(Algorithm):
    """Krum and multi-Krum (Blanchard et al., "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent", NeurIPS 2017; multi-Krum: El Mhamdi et al.,
    ICML 2018).

    Scores every update by its squared distances to its ``n - f - 2`` nearest
    neighbours and keeps the ``select`` best (1: Krum), averaged by sample count.
    Tolerates ``byzantine`` arbitrary updates out of at least ``2 * byzantine + 3``.
    Distances are accumulated chunk by chunk from updates kept on local disk.

    Args:
        byzantine: ``f``, the number of arbitrary (faulty or malicious) updates to
            tolerate in a round.
        select: how many updates to keep and average (``m``); 1 is Krum.
    """

    name = "krum"

    def __init__(self, byzantine: int = 1, select: int = 1) -> None:
        for arg, value, low in (("byzantine", byzantine, 0), ("select", select, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SettingError(f"{arg} must be an int >= {low}, got {value!r}")
        self.byzantine, self.select = byzantine, select

    def setup(self, model: ModelSpec, clients: int) -> None:
        if clients < 2 * self.byzantine + 3:
            raise SettingError(
                f"Krum with byzantine={self.byzantine} needs at least "
                f"{2 * self.byzantine + 3} clients in a round, but the federation has "
                f"{clients}; hint: lower byzantine or add clients"
            )

    def statistic(self) -> Statistic:
        return _KrumStatistic(self.byzantine, self.select)
