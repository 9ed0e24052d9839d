"""Digits halves: vertical federated learning on scikit-learn's 8x8 digits (offline).

The host holds the left half (8x4 pixels) of each digit and the labels; a
collaborator holds the right half. Their ID ranges overlap only partly (host
0-1499, collaborator 300-1796), so the private set intersection matters: the
parties train on the 1,200 digits both hold, 20% of them held out for validation
and test.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_fed.hetero import HeteroDataModule, HeteroNNModule
from lightning_fed.hetero.secure import SecureHeteroNNModule

WIDTH = 32  # every half's feature width; the host adds the two up


@cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target, dtype=torch.int64)


class DigitsHalf(HeteroDataModule):
    """One party's half of the digits, keyed by the digit's index.

    Args:
        side: ``"left"`` (the host: pixels and labels) or ``"right"``.
        first_id, last_id: the inclusive range of digit indices this party holds.
    """

    def __init__(
        self,
        side: str = "left",
        first_id: int = 0,
        last_id: int = 1499,
        batch_size: int = 32,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, test_fraction=test_fraction, seed=seed)
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        self.side, self.first_id, self.last_id = side, first_id, last_id

    def local_ids(self) -> list[int]:
        return list(range(self.first_id, self.last_id + 1))

    def get_item(self, id: Any) -> Any:
        x, y = _digits()
        cols = slice(0, 4) if self.side == "left" else slice(4, 8)
        half = x[int(id), :, :, cols]
        return (half, y[int(id)]) if self.side == "left" else half


def half_cnn() -> nn.Module:
    """A feature model for one 8x4 half."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 2, WIDTH),
    )


class _SGD:
    """Both parties' optimiser: SGD with the module's ``lr`` and ``momentum``."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams  # type: ignore[attr-defined]
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)  # type: ignore[attr-defined]


class DigitsHalfNet(_SGD, HeteroNNModule):
    """A half-digit CNN on every party; the host adds the halves' features and classifies.

    Args:
        feature_key: this party's name (``"left"`` on the host, ``"right"``).
        host: whether this party is the host (it holds the inference model).
        lr, momentum: SGD settings of this party's optimiser.
    """

    def __init__(
        self, feature_key: str = "left", host: bool = True, lr: float = 0.05, momentum: float = 0.9
    ) -> None:
        super().__init__(feature_key=feature_key)
        self.save_hyperparameters()
        self.feature_model = half_cnn()
        if host:
            self.inference_model = nn.Sequential(nn.ReLU(), nn.Linear(WIDTH, 10))


class SecureDigitsHalfNet(_SGD, SecureHeteroNNModule):
    """The secure version: each half's features are projected before the sum, and the
    host never sees the collaborator's (CKKS, see docs/secure_hetero.md).

    Args:
        feature_key, host, lr, momentum: as :class:`DigitsHalfNet`.
        project_layer_config: ``(feature_key, input_dim, output_dim)`` of every half.
        project_layer_lr: the projections' SGD rate (the same on every party).
    """

    def __init__(
        self,
        feature_key: str = "left",
        host: bool = True,
        project_layer_config: list[tuple[str, int, int]] | None = None,
        project_layer_lr: float = 0.05,
        lr: float = 0.05,
        momentum: float = 0.9,
    ) -> None:
        config = project_layer_config or [("left", WIDTH, WIDTH), ("right", WIDTH, WIDTH)]
        super().__init__(feature_key, config, project_layer_lr)
        self.save_hyperparameters()
        self.feature_model = half_cnn()
        if host:
            self.inference_model = nn.Sequential(nn.ReLU(), nn.Linear(WIDTH, 10))


class ComposedDigits(nn.Module):
    """Both halves' CNNs, the sum and the classifier in one module (the central baseline)."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = half_cnn(), half_cnn()
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(WIDTH, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.left(x[..., :4]) + self.right(x[..., 4:]))
