"""FedYogi: Yogi on the server."""

from __future__ import annotations

import torch

from lightning_fed.algorithms.fedopt import AdaptiveServerOptimizer


def yogi_second_moment(v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """``v - (1 - beta2) delta**2 sign(v - delta**2)``: ``v`` grows and shrinks slowly."""
    d2 = delta.square()
    return v - (1 - beta2) * d2 * torch.sign(v - d2)


class FedYogi(AdaptiveServerOptimizer):
    """Yogi as the server optimiser (Reddi et al., "Adaptive Federated Optimization",
    ICLR 2021, Algorithm 2; Yogi: Zaheer et al., NeurIPS 2018).

    Like FedAdam, but the second moment changes additively, which keeps the step
    size from jumping when a round's pseudo-gradient is unusually large.

    Its parameters are FedAdam's (see :class:`AdaptiveServerOptimizer`), with a smaller
    default server learning rate ``lr=0.01``, as in the paper's experiments.
    """

    name = "fedyogi"

    def __init__(
        self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr, beta1, beta2, tau)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return yogi_second_moment(v, delta, self.beta2)
