"""MNIST halves, seed-faithful: vertical federated learning on the two halves of each digit.

The host holds the left 28x14 half of each image and the labels; a collaborator
holds the right half. Every party runs the seed's ``HalfConvNet`` (conv 1->10 kernel
(5, 3), conv 10->20 kernel 5, dropout2d, fc 80->50->20) on its half; the host adds
the two 20-wide features up and runs the seed's ``InferModule`` (fc 20->20->10,
log_softmax). SGD lr 0.01 momentum 0.9, batch 128, as in the seed.

Data:

- offline (the default), the 10,000-image IDX split in ``../shared/data/mnist``:
  the host holds IDs 0-8999, the collaborator 1000-9999, so the private set
  intersection leaves 8,000 common images, 20% of them held out for validation
  and test;
- ``source: torchvision``, torchvision's MNIST (both splits, laid out under
  ``root/MNIST/raw`` or downloaded there with ``download: true``) and its transforms,
  with the seed's ID ranges: training images are IDs 0-59999 and test images 100000 + index;
  the host holds 0-19999 and 100000-104999, the collaborator 10000-29999 and
  103000-106999; the intersection's training IDs train and its test IDs test
  (``SeedSplit``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_fed.hetero import HeteroDataModule, HeteroNNModule
from lightning_fed.hetero.secure import SecureHeteroNNModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mnist"))
from mnist import (  # the sibling example
    DEFAULT_ROOT,
    has_split,
    mnist_tensors,
    torchvision_mnist,
    vision_transforms,
)

WIDTH = 20  # each half's feature width; the host adds the two up
TEST_OFFSET = 100_000  # the seed's IDs of torchvision's test images
SEED_RANGES = {  # the seed's (train, test) ID ranges per side, inclusive
    "left": ((0, 19_999), (100_000, 104_999)),
    "right": ((10_000, 29_999), (103_000, 106_999)),
}


@cache
def _images(source: str, root: str, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (N, 1, 28, 28) images and labels, by ID (see the module docstring)."""
    if source == "idx":
        data = mnist_tensors(root)
        return data.tensors[0], data.tensors[1]
    if not download and not has_split(root, "train"):
        raise FileNotFoundError(
            f"source torchvision uses the seed's ID ranges over both MNIST splits, but the "
            f"training split is not under {Path(root) / 'MNIST' / 'raw'}; pass download: true "
            "on a connected machine, or use source: idx offline"
        )
    tf = vision_transforms()
    parts = [torchvision_mnist(root, train, download=download) for train in (True, False)]
    xs = [tf(p.data.unsqueeze(1)) for p in parts]  # type: ignore[attr-defined]
    ys = [p.targets for p in parts]  # type: ignore[attr-defined]
    return torch.cat(xs).as_subclass(torch.Tensor), torch.cat(ys)  # test image i: row 60000 + i


class MnistHalf(HeteroDataModule):
    """One party's half of MNIST, keyed by the image's ID.

    Args:
        side: ``"left"`` (the host: pixels and labels) or ``"right"``.
        first_id, last_id: the inclusive ID range this party holds (``source: idx``).
        source: ``"idx"`` (offline) or ``"torchvision"`` (the seed's data and ID ranges).
        root: the IDX folder, or torchvision's dataset folder.
        batch_size: the seed's 128.
        test_fraction, seed: the default seeded train/test split (``source: idx``).
        download: let torchvision download MNIST into ``root`` (``source: torchvision``).
    """

    def __init__(
        self,
        side: str = "left",
        first_id: int = 0,
        last_id: int = 8999,
        source: str = "idx",
        root: str = str(DEFAULT_ROOT),
        batch_size: int = 128,
        test_fraction: float = 0.2,
        seed: int = 0,
        download: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, test_fraction=test_fraction, seed=seed)
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if source not in ("idx", "torchvision"):
            raise ValueError(f"source must be 'idx' or 'torchvision', got {source!r}")
        self.side, self.first_id, self.last_id = side, first_id, last_id
        self.source, self.root, self.download = source, root, download

    @override
    def local_ids(self) -> list[int]:
        if self.source == "torchvision":
            (a, b), (c, d) = SEED_RANGES[self.side]
            return [*range(a, b + 1), *range(c, d + 1)]
        return list(range(self.first_id, self.last_id + 1))

    @override
    def split_dataset(self, ids: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        if self.source == "torchvision":  # the seed's split
            return [i for i in ids if i < TEST_OFFSET], [i for i in ids if i >= TEST_OFFSET]
        return super().split_dataset(ids)

    @override
    def get_item(self, id: Any) -> Any:
        x, y = _images(self.source, self.root, self.download)
        row = int(id) if int(id) < TEST_OFFSET else 60_000 + int(id) - TEST_OFFSET
        half = x[row, :, :, :14] if self.side == "left" else x[row, :, :, 14:]
        return (half, y[row]) if self.side == "left" else half


class HalfConvNet(nn.Module):
    """The seed's feature model of one 28x14 half: conv (5, 3), conv 5, fc 80->50->20."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=(5, 3))
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(80, 50)
        self.fc2 = nn.Linear(50, width)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # 24x12 -> 12x6
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))  # 8x2 -> 4x1
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.dropout(x, training=self.training)
        out: torch.Tensor = self.fc2(x)
        return out


class InferModule(nn.Module):
    """The seed's inference model: fc 20->20, ReLU, fc 20->10, log_softmax."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 20)
        self.fc2 = nn.Linear(20, 10)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=-1)


class _SeedTraining:
    """The seed's loss (NLL on log-probabilities) and optimiser (SGD, lr, momentum)."""

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(output, labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams  # type: ignore[attr-defined]
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)  # type: ignore[attr-defined]


class MnistHalfNet(_SeedTraining, HeteroNNModule):
    """The seed's HeteroNN party: a HalfConvNet everywhere, the InferModule on the host.

    Args:
        feature_key: this party's name (``"left"`` on the host, ``"right"``).
        host: whether this party is the host (it holds the inference model).
        lr, momentum: the seed's SGD settings.
        is_feature_trainable: False freezes this party's feature model.
    """

    def __init__(
        self,
        feature_key: str = "left",
        host: bool = True,
        lr: float = 0.01,
        momentum: float = 0.9,
        is_feature_trainable: bool = True,
    ) -> None:
        super().__init__(feature_key=feature_key, is_feature_trainable=is_feature_trainable)
        self.save_hyperparameters()
        self.feature_model = HalfConvNet()
        if host:
            self.inference_model = InferModule()


class SecureMnistHalfNet(_SeedTraining, SecureHeteroNNModule):
    """The seed's secure HeteroNN party: HalfConvNet, a 20 -> 20 projection per half
    (CKKS for the collaborator's, see docs/secure_hetero.md), the InferModule on the host.

    Args:
        feature_key, host, lr, momentum, is_feature_trainable: as :class:`MnistHalfNet`.
        project_layer_config: ``(feature_key, input_dim, output_dim)`` of every half.
        project_layer_lr: the projections' SGD rate (the same on every party).
    """

    def __init__(
        self,
        feature_key: str = "left",
        host: bool = True,
        project_layer_config: list[tuple[str, int, int]] | None = None,
        project_layer_lr: float = 0.1,
        lr: float = 0.01,
        momentum: float = 0.9,
        is_feature_trainable: bool = True,
    ) -> None:
        config = project_layer_config or [("left", WIDTH, WIDTH), ("right", WIDTH, WIDTH)]
        super().__init__(feature_key, config, project_layer_lr, is_feature_trainable)
        self.save_hyperparameters()
        self.feature_model = HalfConvNet()
        if host:
            self.inference_model = InferModule()


class ComposedMnist(nn.Module):
    """Both halves' HalfConvNets, the sum and the InferModule in one module (the baseline)."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.head = HalfConvNet(), HalfConvNet(), InferModule()

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.left(x[..., :14]) + self.right(x[..., 14:]))
