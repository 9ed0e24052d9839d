"""FedAdagrad: Adagrad on the server."""

from __future__ import annotations

import torch

from lightning_fed.algorithms.fedopt import AdaptiveServerOptimizer


def adagrad_second_moment(v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``v + delta**2``: the sum of squared pseudo-gradients."""
    return v + delta.square()


class FedAdagrad(AdaptiveServerOptimizer):
    """Adagrad as the server optimiser (Reddi et al., "Adaptive Federated
    Optimization", ICLR 2021, Algorithm 2).

    The step shrinks as squared pseudo-gradients accumulate; suited to sparse
    updates. ``beta2`` is unused by Adagrad and not a parameter.

    Args:
        lr: the server learning rate.
        beta1: the first-moment decay (0 for plain Adagrad).
        tau: the adaptivity (smaller: more adaptive).
    """

    name = "fedadagrad"

    def __init__(self, lr: float = 0.1, beta1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__(lr, beta1, 0.0, tau)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return adagrad_second_moment(v, delta)
