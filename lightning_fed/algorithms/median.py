"""Coordinate-wise median: robust to a minority of arbitrary updates."""

from __future__ import annotations

import torch

from lightning_fed.algorithms.base import Algorithm, Statistic
from lightning_fed.algorithms.spool import SpooledStatistic, UpdateSpool, check_finite


def coordinate_median(values: torch.Tensor) -> torch.Tensor:
    """The median of each column of ``values`` (``clients x n``); even counts average
    the two middle values."""
    check_finite(values)
    ordered = values.sort(dim=0).values
    k = ordered.shape[0]
    if k % 2:
        return ordered[k // 2]
    return (ordered[k // 2 - 1] + ordered[k // 2]) / 2


class _MedianStatistic(SpooledStatistic):
    def reduce(self, spool: UpdateSpool) -> dict[str, torch.Tensor]:
        return self.coordinatewise(spool, coordinate_median)


class Median(Algorithm):
    """Coordinate-wise median of the clients' models (Yin et al., "Byzantine-Robust
    Distributed Learning: Towards Optimal Statistical Rates", ICML 2018).

    Each coordinate of the new global model is the median of the clients' values, so
    fewer than half the clients cannot drag it anywhere. Sample counts are not used
    (a client cannot buy weight by claiming more samples). The aggregator keeps the
    round's updates on local disk and computes the median chunk by chunk, so its
    memory stays near the model's size whatever the number of clients.
    """

    name = "median"

    def statistic(self) -> Statistic:
        return _MedianStatistic()
