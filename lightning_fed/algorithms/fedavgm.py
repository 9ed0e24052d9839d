"""FedAvgM: FedAvg with server momentum."""

from __future__ import annotations

import torch

from lightning_fed.algorithms.base import check_number
from lightning_fed.algorithms.fedopt import ServerOptimizer


def momentum_step(
    x: torch.Tensor, velocity: torch.Tensor, delta: torch.Tensor, lr: float, momentum: float
) -> torch.Tensor:
    """``v <- momentum v + delta`` (in place), then ``x + lr v``."""
    velocity.mul_(momentum).add_(delta)
    return x + lr * velocity


class FedAvgM(ServerOptimizer):
    """Server momentum on the pseudo-gradient (Hsu, Qi and Brown, "Measuring the Effects
    of Non-Identical Data Distribution for Federated Visual Classification", 2019).

    With ``momentum=0`` and ``lr=1`` it is FedAvg. It helps when client data differ
    (non-IID) and rounds disagree. What matters is the effective learning rate
    ``lr / (1 - momentum)``: the paper finds about 1 works well, hence the defaults
    (``lr=0.1`` with ``momentum=0.9``); ``lr=1`` with ``momentum=0.9`` is ten times
    that, and diverged on label-skewed MNIST here.

    Args:
        lr: the server learning rate.
        momentum: the server momentum in [0, 1).
    """

    name = "fedavgm"

    def __init__(self, lr: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__(lr)
        self.momentum = check_number("momentum", momentum, at_least=0, below=1)

    def step(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        velocity = self.moment("velocity", name, delta)
        return momentum_step(x, velocity, delta, self.lr, self.momentum)
