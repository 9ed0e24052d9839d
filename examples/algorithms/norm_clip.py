"""Your own federated algorithm in one file: FedAvg with clients' updates clipped in norm.

Bounding each client's update norm limits what one client (faulty, or poisoned) can
do to the global model (Sun et al., "Can You Really Backdoor Federated Learning?",
2019). Import this module in every party's process (the aggregator to choose it,
the clients to follow it), then on the aggregator:
``FedAvgStrategy(..., algorithm=NormClip(max_norm=1.0))``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_fed.algorithms import Algorithm, ClientAlgorithm, ClientRound


class NormClip(Algorithm):
    """FedAvg where every client scales its update ``w - w_global`` to at most ``max_norm``."""

    name = "norm-clip"  # what clients look up; unique among the algorithms they import

    def __init__(self, max_norm: float = 1.0) -> None:
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
        self.max_norm = float(max_norm)  # stored under the argument's name: sent to clients

    def client(self) -> ClientAlgorithm:
        return NormClipClient(self.max_norm)


class NormClipClient(ClientAlgorithm):
    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm
        self.start: dict[str, torch.Tensor] = {}  # the round's global trainable weights

    def start_round(self, start: ClientRound) -> None:
        self.start = {n: start.global_state[n].clone() for n in start.model.trainable}

    def finish_round(self, module: pl.LightningModule) -> dict[str, torch.Tensor]:
        params = dict(module.named_parameters())
        with torch.no_grad():
            deltas = {n: params[n] - w.to(params[n].device) for n, w in self.start.items()}
            norm = torch.linalg.vector_norm(torch.stack([d.norm() for d in deltas.values()]))
            scale = min(1.0, self.max_norm / max(float(norm), 1e-12))
            for n, delta in deltas.items():  # the upload is the module's weights after this
                params[n].copy_(self.start[n].to(delta.device) + scale * delta)
        return {}  # no extra tensors to upload
