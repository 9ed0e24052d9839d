"""FedOpt's frame (Reddi et al., ICLR 2021): a server optimiser on the pseudo-gradient.

Clients train as in FedAvg; the aggregator treats ``delta = mean - global`` (the
clients' average change, the negative of a gradient) as the step direction of its
own optimiser. Only trainable parameters step; buffers take the clients' mean.
The maths are pure functions so that the tests can check them against the paper.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from lightning_fed.algorithms.base import (
    Algorithm,
    ModelSpec,
    RoundAggregate,
    Tensors,
    check_number,
)


def pseudo_gradient(global_tensor: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``mean - global`` in at least float32: the round's average client change."""
    dtype = torch.promote_types(global_tensor.dtype, torch.float32)
    return mean.to(dtype) - global_tensor.to(dtype)


class ServerOptimizer(Algorithm):
    """A server optimiser with per-tensor state (moments), checkpointed with each round.

    Subclasses implement :meth:`step` for one tensor: given the current global tensor
    and its pseudo-gradient, return the new tensor, updating ``self.moments``.
    """

    def __init__(self, lr: float) -> None:
        self.lr = check_number("lr", lr, above=0)
        self.trainable: list[str] = []
        #: moment name -> tensor name -> value (float32 or wider, on the CPU)
        self.moments: dict[str, dict[str, torch.Tensor]] = {}

    def setup(self, model: ModelSpec, clients: int) -> None:
        self.trainable = sorted(model.trainable)

    def server_update(
        self, global_state: Mapping[str, torch.Tensor], aggregate: RoundAggregate
    ) -> Tensors:
        new = dict(aggregate.mean)
        for name in self.trainable:
            x = global_state[name]
            delta = pseudo_gradient(x, aggregate.mean[name])
            new[name] = self.step(name, x.to(delta.dtype), delta).to(x.dtype)
        return new

    @abstractmethod
    def step(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The new value of tensor ``name`` (``x``) after a step on ``delta``."""

    def moment(self, kind: str, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Moment ``kind`` of tensor ``name``, created as ``fill`` on first use."""
        table = self.moments.setdefault(kind, {})
        if name not in table:
            table[name] = torch.full_like(like, fill)
        return table[name]

    def state_dict(self) -> dict[str, Any]:
        return {"moments": {k: dict(v) for k, v in self.moments.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.moments = {k: dict(v) for k, v in state.get("moments", {}).items()}


def adaptive_step(
    x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, tau: float
) -> torch.Tensor:
    """Reddi et al.'s update for all three adaptive optimisers: ``x + lr m / (sqrt(v) + tau)``."""
    return x + lr * m / (v.sqrt() + tau)


def first_moment(m: torch.Tensor, delta: torch.Tensor, beta1: float) -> torch.Tensor:
    """``m <- beta1 m + (1 - beta1) delta``, in place."""
    return m.mul_(beta1).add_(delta, alpha=1 - beta1)


class AdaptiveServerOptimizer(ServerOptimizer):
    """FedAdagrad, FedAdam and FedYogi: they differ only in the second moment.

    ``m`` starts at 0 and ``v`` at ``tau**2``, as in the paper's Algorithm 2.

    Args:
        lr: the server learning rate (the paper tunes it with the clients' own).
        beta1: the first-moment decay, in [0, 1).
        beta2: the second-moment decay, in [0, 1).
        tau: the adaptivity, > 0 (smaller: more adaptive).
    """

    def __init__(
        self, lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr)
        self.beta1 = check_number("beta1", beta1, at_least=0, below=1)
        self.beta2 = check_number("beta2", beta2, at_least=0, below=1)
        self.tau = check_number("tau", tau, above=0)

    def step(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        m = first_moment(self.moment("m", name, delta), delta, self.beta1)
        v = self.moment("v", name, delta, fill=self.tau**2)
        v.copy_(self.second_moment(v, delta))
        return adaptive_step(x, m, v, self.lr, self.tau)

    @abstractmethod
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The new ``v`` from the previous one and the pseudo-gradient."""
