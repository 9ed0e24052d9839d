"""FedAdam: Adam on the server."""

from __future__ import annotations

import torch

from lightning_fed.algorithms.fedopt import AdaptiveServerOptimizer


def adam_second_moment(v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """``beta2 v + (1 - beta2) delta**2``."""
    return beta2 * v + (1 - beta2) * delta.square()


class FedAdam(AdaptiveServerOptimizer):
    """Adam as the server optimiser (Reddi et al., "Adaptive Federated Optimization",
    ICLR 2021, Algorithm 2).

    Parameters (see :class:`AdaptiveServerOptimizer`): ``lr=0.1``, ``beta1=0.9``,
    ``beta2=0.99``, ``tau=1e-3``. The paper tunes ``lr`` together with the clients'
    own learning rate; good values are often 1e-2 to 1e-1.
    """

    name = "fedadam"  # its parameters and defaults are AdaptiveServerOptimizer's

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return adam_second_moment(v, delta, self.beta2)
