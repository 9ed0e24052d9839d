"""MNIST, seed-faithful: the seed's ConvNet, 2 clients, 5 rounds, SGD lr 0.01 momentum 0.9.

Data, two ways of reading the same IDX files:

- ``source="idx"`` (the default): the gzipped IDX files in ``root`` read directly,
  no torchvision needed. Offline this is the 10,000-image test split in
  ``../shared/data/mnist``.
- ``source="torchvision"``: ``torchvision.datasets.MNIST`` over ``root`` laid out as
  torchvision expects (``root/MNIST/raw/*-ubyte``), with torchvision's transforms
  (and optional training augmentation). ``download=True`` fetches the full dataset
  on a connected machine; ``python examples/mnist/mnist.py DIR`` lays the offline
  test split out under ``DIR`` for torchvision.

When the 60,000 training images are there (torchvision, downloaded), they are shared
among the clients and the 10,000 test images are the aggregator's holdout, as in the
seed. With the test split only, its first ``train_pool`` (8,000) images are shared
among the clients and the last 2,000 are the holdout.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
from pathlib import Path
from typing import Any

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
IDX_FILES = {  # split -> (images, labels), as MNIST's files are named
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


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


def layout_for_torchvision(
    into: str | os.PathLike[str], source: str | os.PathLike[str] = DEFAULT_ROOT
) -> Path:
    """Lay ``source``'s gzipped IDX files out as torchvision expects: ``into/MNIST/raw``.

    torchvision reads the unpacked files (``t10k-images-idx3-ubyte``, ...); the splits
    present in ``source`` are unpacked, the others left out. Returns ``into``.
    """
    raw = Path(into) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    found = 0
    for names in IDX_FILES.values():
        for name in names:
            packed = Path(source) / f"{name}.gz"
            if packed.exists():
                with gzip.open(packed, "rb") as src, open(raw / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found += 1
    if not found:
        raise FileNotFoundError(
            f"no MNIST IDX file (*-ubyte.gz) in {source}; point source at the folder "
            "that holds t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
        )
    return Path(into)


def has_split(root: str | os.PathLike[str], split: str) -> bool:
    """Whether ``root/MNIST/raw`` holds both unpacked files of ``split`` ("train", "t10k")."""
    return all((Path(root) / "MNIST" / "raw" / name).exists() for name in IDX_FILES[split])


def vision_transforms(augment: bool = False) -> Any:
    """torchvision transforms: to a float image in [0, 1], the seed's normalisation.

    ``augment`` adds a small random rotation and shift for training images.
    """
    from torchvision.transforms import v2

    steps: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if augment:
        steps.append(v2.RandomAffine(degrees=10, translate=(0.1, 0.1)))
    steps.append(v2.Normalize((MEAN,), (STD,)))
    return v2.Compose(steps)


def torchvision_mnist(
    root: str | os.PathLike[str], train: bool, transform: Any = None, download: bool = False
) -> torch.utils.data.Dataset:
    """``torchvision.datasets.MNIST`` that needs only the files of the split it reads.

    torchvision's own check wants all four files; offline only the test split exists.
    """
    from torchvision import datasets

    class MnistSplit(datasets.MNIST):
        @property
        @override
        def raw_folder(self) -> str:  # torchvision names it after the class
            return os.path.join(self.root, "MNIST", "raw")

        @override
        def _check_exists(self) -> bool:
            return has_split(self.root, "train" if self.train else "t10k")

    split = "train" if train else "t10k"
    if not download and not has_split(root, split):
        raise FileNotFoundError(
            f"torchvision's MNIST {split} split is not under {Path(root) / 'MNIST' / 'raw'}; "
            f"lay the IDX files out with `python examples/mnist/mnist.py {root}`, or pass "
            "download=True on a connected machine"
        )
    return MnistSplit(str(root), train=train, transform=transform, download=download)


def labels_of(dataset: torch.utils.data.Dataset) -> list[int]:
    """Every label of an MNIST dataset or a Subset of one, without reading the images."""
    if isinstance(dataset, Subset):
        inner = labels_of(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, TensorDataset):
        return [int(y) for y in dataset.tensors[1].tolist()]
    return [int(y) for y in dataset.targets]  # type: ignore[attr-defined]


#: The ConvNet's activations by name.
ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}


class ConvNet(L.LightningModule):
    """The seed's ConvNet: conv 1->10 k5, conv 10->20 k5, dropout2d, fc 320->50->10.

    Args:
        lr: SGD's learning rate.
        momentum: SGD's momentum.
        activation: ``"relu"`` (the seed's) or ``"tanh"``. Under DP-SGD a bounded
            activation keeps the clipped per-example gradients informative (Papernot
            et al., "Tempered Sigmoid Activations for Deep Learning with Differential
            Privacy", AAAI 2021); ``benchmarks/privacy.py`` measures both.
        dropout: the dropout probability of both dropout layers (the seed's 0.5; 0 turns
            them off, which DP-SGD's noise makes unnecessary).
        cosine_epochs: anneal the learning rate to 0 along a cosine over this many
            epochs (0: a constant rate, the seed's). Under DP-SGD the late, small steps
            average the noise out of the final model.
    """

    def __init__(
        self,
        lr: float = 0.01,
        momentum: float = 0.9,
        activation: str = "relu",
        dropout: float = 0.5,
        cosine_epochs: int = 0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if cosine_epochs < 0:
            raise ValueError(f"cosine_epochs must be >= 0, got {cosine_epochs!r}")
        self.cosine_epochs = cosine_epochs
        self.save_hyperparameters()
        self.act = ACTIVATIONS[activation]
        self.dropout = dropout
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d(dropout)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)
        # torchmetrics Metric objects: with evaluate_on_clients the aggregator merges
        # their states exactly. Not in state_dict, so never federated.
        self.train_accuracy = MulticlassAccuracy(num_classes=10)
        self.val_accuracy = MulticlassAccuracy(num_classes=10)
        self.test_accuracy = MulticlassAccuracy(num_classes=10)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(F.max_pool2d(self.conv1(x), 2))
        x = self.act(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = self.act(self.fc1(x))
        x = F.dropout(x, p=self.dropout, training=self.training)
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
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)
        if not self.cosine_epochs:
            return optimizer
        # One step per epoch: a client trains one epoch a round, so every client's rate
        # follows the same curve over the federation's rounds.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.cosine_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule}}


class MnistData(L.LightningDataModule):
    """One party's MNIST: a client's IID share of the training pool, or the holdout.

    Args:
        client_index: this client's share (0-based), None for the aggregator's holdout.
        num_clients: how many clients share the training pool.
        source: ``"idx"`` (``root``'s gzipped IDX files, read directly) or
            ``"torchvision"`` (``torchvision.datasets.MNIST`` over ``root/MNIST/raw``).
        root: folder of the gzipped IDX files, or torchvision's dataset folder.
        batch_size: the seed's 128.
        train_pool: with the test split only, how many of its images the clients share.
        seed: seeds the client shares (the same on every party).
        dirichlet_alpha: None for IID shares; else label-skewed shares, each class
            split by proportions drawn from Dir(alpha) (0.1: a few classes per client).
        augment: random rotation and shift of training images (``source="torchvision"``).
        download: let torchvision download the full dataset into ``root``.
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
        augment: bool = False,
        download: bool = False,
    ) -> None:
        super().__init__()
        if source not in ("idx", "torchvision"):
            raise ValueError(f"source must be 'idx' or 'torchvision', got {source!r}")
        if source == "idx" and (augment or download):
            raise ValueError(
                "augment and download need source='torchvision' (the IDX reader has no "
                "transforms and reads local files only)"
            )
        self.client_index, self.num_clients = client_index, num_clients
        self.source, self.root = source, root
        self.batch_size, self.train_pool, self.seed = batch_size, train_pool, seed
        self.dirichlet_alpha, self.augment, self.download = dirichlet_alpha, augment, download

    def _pool_and_holdout(self) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
        if self.source == "idx":
            data = mnist_tensors(self.root)
            return Subset(data, range(self.train_pool)), Subset(
                data, range(self.train_pool, len(data))
            )
        train_tf, eval_tf = vision_transforms(self.augment), vision_transforms()
        holdout = torchvision_mnist(self.root, False, eval_tf, self.download)
        if self.download or has_split(self.root, "train"):  # the seed's 60,000 / 10,000
            return torchvision_mnist(self.root, True, train_tf, self.download), holdout
        pool = torchvision_mnist(self.root, False, train_tf)
        return Subset(pool, range(self.train_pool)), Subset(
            holdout, range(self.train_pool, len(holdout))
        )  # type: ignore[arg-type]

    @override
    def setup(self, stage: str) -> None:
        pool, self.holdout = self._pool_and_holdout()
        if self.client_index is None:
            self.train = pool
            return
        if self.dirichlet_alpha is None:
            parts = iid_partition(len(pool), self.num_clients, seed=self.seed)  # type: ignore[arg-type]
        else:
            parts = dirichlet_partition(
                labels_of(pool),
                self.num_clients,
                alpha=self.dirichlet_alpha,
                seed=self.seed,
                min_size=10,
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


if __name__ == "__main__":  # python examples/mnist/mnist.py DIR [SOURCE]
    if len(sys.argv) not in (2, 3):
        sys.exit(
            "usage: python examples/mnist/mnist.py DIR [IDX_FOLDER]: lay MNIST out for torchvision"
        )
    into = layout_for_torchvision(sys.argv[1], *sys.argv[2:])
    print(
        f"MNIST laid out for torchvision under {into / 'MNIST' / 'raw'}: "
        f"use --data.source=torchvision --data.root={into}"
    )
