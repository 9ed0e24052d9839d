"""MNIST, seed-faithful: the seed's ConvNet, 2 clients, 5 rounds, SGD lr 0.01 momentum 0.9.

Data: on a connected machine, torchvision's MNIST (``source="torchvision"``) with the
60,000 training images shared among clients and the 10,000 test images held out by the
aggregator. Offline (the default here), the 10,000-image IDX split in
``../shared/data/mnist``: the first 8,000 images are shared among the clients, the
last 2,000 are the aggregator's holdout. The IDX files are read directly (no
torchvision needed).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_fed.fedavg import dirichlet_partition, iid_partition

DEFAULT_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
MEAN, STD = 0.1307, 0.3081  # the seed's Normalize((0.1307,), (0.3081,))


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally .gz): unsigned bytes, any number of dimensions."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def mnist_tensors(root: str | os.PathLike[str], prefix: str = "t10k") -> TensorDataset:
    """Normalised (N, 1, 28, 28) images and int64 labels from ``root``'s IDX files."""
    root = Path(root)
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    x = (torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0 - MEAN) / STD
    return TensorDataset(x, torch.tensor(labels, dtype=torch.int64))


class ConvNet(L.LightningModule):
    """The seed's ConvNet: conv 1->10 k5, conv 10->20 k5, dropout2d, fc 320->50->10."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)
        # torchmetrics Metric objects: with evaluate_on_clients the aggregator merges
        # their states exactly. Not in state_dict, so never federated.
        self.train_accuracy = MulticlassAccuracy(num_classes=10)
        self.val_accuracy = MulticlassAccuracy(num_classes=10)
        self.test_accuracy = MulticlassAccuracy(num_classes=10)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = F.nll_loss(out, y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True)
        accuracy = getattr(self, f"{stage}_accuracy")
        accuracy(out, y)
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> None:
        self._step(batch, "val")

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> None:
        self._step(batch, "test")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)


class MnistData(L.LightningDataModule):
    """One party's MNIST: a client's IID share of the training pool, or the holdout.

    Args:
        client_index: this client's share (0-based), None for the aggregator's holdout.
        num_clients: how many clients share the training pool.
        source: ``"idx"`` (offline, ``root``'s t10k files split 8,000/2,000) or
            ``"torchvision"`` (the full dataset; needs torchvision and a download).
        root: folder of the IDX files, or torchvision's download folder.
        batch_size: the seed's 128.
        seed: seeds the client shares (the same on every party).
        dirichlet_alpha: None for IID shares; else label-skewed shares, each class
            split by proportions drawn from Dir(alpha) (0.1: a few classes per client).
    """

    def __init__(
        self,
        client_index: int | None = None,
        num_clients: int = 2,
        source: str = "idx",
        root: str = str(DEFAULT_ROOT),
        batch_size: int = 128,
        train_pool: int = 8000,
        seed: int = 0,
        dirichlet_alpha: float | None = None,
    ) -> None:
        super().__init__()
        if source not in ("idx", "torchvision"):
            raise ValueError(f"source must be 'idx' or 'torchvision', got {source!r}")
        self.client_index, self.num_clients = client_index, num_clients
        self.source, self.root = source, root
        self.batch_size, self.train_pool, self.seed = batch_size, train_pool, seed
        self.dirichlet_alpha = dirichlet_alpha

    def _pool_and_holdout(self) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
        if self.source == "torchvision":  # pragma: no cover - needs a connected machine
            from torchvision import datasets, transforms

            tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
            train = datasets.MNIST(self.root, train=True, download=True, transform=tf)
            test = datasets.MNIST(self.root, train=False, download=True, transform=tf)
            return train, test
        data = mnist_tensors(self.root)
        n = len(data)
        return Subset(data, range(self.train_pool)), Subset(data, range(self.train_pool, n))

    @override
    def setup(self, stage: str) -> None:
        pool, self.holdout = self._pool_and_holdout()
        if self.client_index is None:
            self.train = pool
            return
        if self.dirichlet_alpha is None:
            parts = iid_partition(len(pool), self.num_clients, seed=self.seed)  # type: ignore[arg-type]
        else:
            labels = [int(pool[i][1]) for i in range(len(pool))]  # type: ignore[arg-type]
            parts = dirichlet_partition(
                labels, self.num_clients, alpha=self.dirichlet_alpha, seed=self.seed, min_size=10
            )
        self.train = Subset(pool, parts[self.client_index])

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return [] if self.client_index is not None else DataLoader(self.holdout, batch_size=1000)

    @override
    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.holdout, batch_size=1000)
