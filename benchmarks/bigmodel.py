"""The ~N MB model the FedAvg and privacy benchmarks move: one square linear layer."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Big(L.LightningModule):
    """A ``side x side`` linear layer (``mb`` MB of float32) and a 2-class head."""

    def __init__(self, mb: int) -> None:
        super().__init__()
        self.side = int((mb * 2**20 / 4) ** 0.5)
        self.big = nn.Linear(self.side, self.side, bias=False)
        self.head = nn.Linear(self.side, 2)

    def training_step(self, batch: Any, idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.big(x)), y)

    def validation_step(self, batch: Any, idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-4)

    def loader(self) -> DataLoader[Any]:
        """One batch of 8 random inputs: a round's training is a single small step."""
        x = torch.randn(8, self.side)
        return DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=8)
