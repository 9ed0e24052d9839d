"""An algorithm that only the aggregator's process imports (the clients never do)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lightning_fed.algorithms import Algorithm, RoundAggregate


class Halving(Algorithm):
    """Moves the global model half-way to the clients' mean."""

    name = "halving"

    def server_update(
        self, global_state: Mapping[str, torch.Tensor], aggregate: RoundAggregate
    ) -> dict[str, torch.Tensor]:
        return {
            k: (global_state[k] + v) / 2 if v.is_floating_point() else v
            for k, v in aggregate.mean.items()
        }
