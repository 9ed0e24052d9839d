"""Coordinate-wise trimmed mean: drop the extremes of each coordinate, average the rest."""

from __future__ import annotations

import math

import torch

from lightning_fed.algorithms.base import Algorithm, Statistic, check_number
from lightning_fed.algorithms.spool import SpooledStatistic, UpdateSpool, check_finite


def trimmed_mean(values: torch.Tensor, beta: float) -> torch.Tensor:
    """Per column of ``values`` (``clients x n``): drop the ``floor(beta * clients)``
    largest and smallest values and average the others."""
    check_finite(values)
    k = values.shape[0]
    cut = math.floor(beta * k)
    ordered = values.sort(dim=0).values
    return ordered[cut : k - cut].mean(dim=0)


class _TrimmedStatistic(SpooledStatistic):
    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def reduce(self, spool: UpdateSpool) -> dict[str, torch.Tensor]:
        return self.coordinatewise(spool, lambda values: trimmed_mean(values, self.beta))


class TrimmedMean(Algorithm):
    """Coordinate-wise trimmed mean (Yin et al., "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates", ICML 2018).

    For each coordinate the ``floor(beta * clients)`` largest and smallest values are
    dropped and the rest averaged (unweighted): robust to that many arbitrary
    clients, and closer to FedAvg than the median when all are honest. Computed chunk
    by chunk from updates kept on local disk.

    Args:
        beta: the fraction trimmed from each end, in [0, 0.5).
    """

    name = "trimmed-mean"

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = check_number("beta", beta, at_least=0, below=0.5)

    def statistic(self) -> Statistic:
        return _TrimmedStatistic(self.beta)
