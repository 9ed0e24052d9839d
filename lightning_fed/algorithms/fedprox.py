"""FedProx: a proximal term keeps each client near the round's global model."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.optim import Optimizer
from typing_extensions import override

from lightning_fed.algorithms.base import (
    Algorithm,
    ClientAlgorithm,
    ClientRound,
    check_number,
    stepping_parameters,
)


def proximal_gradient(weight: torch.Tensor, anchor: torch.Tensor, mu: float) -> torch.Tensor:
    """The gradient of ``mu/2 * ||weight - anchor||^2`` with respect to ``weight``."""
    return mu * (weight - anchor)


class FedProx(Algorithm):
    """FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

    Each client minimises its loss plus ``mu/2 * ||w - w_global||^2``: the gradient
    of that term is added to every trainable parameter's gradient before each
    optimizer step (after AMP unscaling and gradient accumulation, before clipping),
    with the user's own optimiser(s). The aggregator averages as FedAvg does.
    ``mu=0`` is FedAvg. The paper's ``mu`` values run from 0.001 to 1; larger
    values hold clients with very different data closer together.

    Args:
        mu: the proximal coefficient (>= 0).
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = check_number("mu", mu, at_least=0)

    def client(self) -> ClientAlgorithm:
        return FedProxClient(self.mu)


class FedProxClient(ClientAlgorithm):
    """Adds ``mu * (w - w_global)`` to each trainable parameter's gradient."""

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self._anchor: dict[int, torch.Tensor] = {}  # id(parameter) -> its global value

    @override
    def start_round(self, start: ClientRound) -> None:
        params = dict(start.module.named_parameters())
        self._anchor = {
            id(params[n]): start.global_state[n].detach().to(params[n].device, params[n].dtype)
            for n in start.model.trainable
            if n in params
        }

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        for _, p in stepping_parameters(optimizer):
            anchor = self._anchor.get(id(p))
            if anchor is not None:
                p.grad.add_(proximal_gradient(p.detach(), anchor, self.mu))  # type: ignore[union-attr]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}
