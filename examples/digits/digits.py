"""Digits: scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline).

A small CNN and a datamodule that plays either role of a simulated federation:

- ``DigitsData(client_index=i, num_clients=N)``: client i's share of the training
  split (IID or Dirichlet non-IID);
- ``DigitsData()`` (no client index): the held-out validation/test split, which is
  what the aggregator holds.

The same split (seeded) is used by every party, so shares never overlap the holdout.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_fed.fedavg import dirichlet_partition, iid_partition


class DigitsCNN(L.LightningModule):
    """Two conv layers and a linear head for 8x8 digits."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, 10))
        # torchmetrics Metric objects: with evaluate_on_clients the aggregator merges
        # their states exactly. Not in state_dict, so never federated.
        self.train_accuracy = MulticlassAccuracy(num_classes=10)
        self.val_accuracy = MulticlassAccuracy(num_classes=10)
        self.test_accuracy = MulticlassAccuracy(num_classes=10)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        accuracy = getattr(self, f"{stage}_accuracy")
        accuracy(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=on_step)
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    @override
    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum
        )


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 1, 8, 8) floats in [0, 1] and int64 labels."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target, dtype=torch.int64)


class DigitsData(L.LightningDataModule):
    """One party's view of the digits.

    Args:
        client_index: which client's share of the training split (0-based); None for
            the aggregator's holdout.
        num_clients: how many clients share the training split.
        holdout: fraction of the digits held out for validation and test.
        split: ``"iid"`` or ``"dirichlet"`` (label-skewed, see ``alpha``).
        alpha: the Dirichlet concentration (smaller is more skewed).
        batch_size: training batch size.
        seed: seeds the holdout split and the client shares (same on every party).
    """

    def __init__(
        self,
        client_index: int | None = None,
        num_clients: int = 3,
        holdout: float = 0.2,
        split: str = "iid",
        alpha: float = 0.5,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if split not in ("iid", "dirichlet"):
            raise ValueError(f"split must be 'iid' or 'dirichlet', got {split!r}")
        if client_index is not None and not 0 <= client_index < num_clients:
            raise ValueError(f"client_index must be in [0, {num_clients}), got {client_index}")
        self.client_index = client_index
        self.num_clients = num_clients
        self.holdout = holdout
        self.split = split
        self.alpha = alpha
        self.batch_size = batch_size
        self.seed = seed

    @override
    def setup(self, stage: str) -> None:
        x, y = digits_tensors()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_hold = int(len(y) * self.holdout)
        val, test = order[: n_hold // 2], order[n_hold // 2 : n_hold]
        self.val = TensorDataset(x[val], y[val])  # the aggregator's two held-out halves
        self.test = TensorDataset(x[test], y[test])
        train_idx = order[n_hold:]
        self.train_all = TensorDataset(x[train_idx], y[train_idx])
        if self.client_index is None:
            return
        if self.split == "iid":
            parts = iid_partition(len(train_idx), self.num_clients, seed=self.seed)
        else:
            parts = dirichlet_partition(
                y[train_idx], self.num_clients, alpha=self.alpha, seed=self.seed
            )
        share = parts[self.client_index]
        n_val = max(1, len(share) // 10)  # each data owner validates on 10% of its share
        self.local = Subset(self.train_all, share[n_val:])
        self.local_val = Subset(self.train_all, share[:n_val])

    @override
    def train_dataloader(self) -> DataLoader:
        data = self.train_all if self.client_index is None else self.local
        return DataLoader(data, batch_size=self.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        if self.client_index is not None:  # clients never see the holdout
            return DataLoader(self.local_val, batch_size=512)
        return DataLoader(self.val, batch_size=512)

    @override
    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=512)
