"""Local DP-SGD across several fits of one process (the callback a LocalDP client adds to
its Trainer, driven by real Lightning Trainers): every fit clips and noises, the
accountant keeps counting, and each fit leaves the module without Opacus' hooks."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_fed.privacy.accounting import Accountant
from lightning_fed.privacy.dp_settings import LocalDP
from lightning_fed.privacy.dpsgd import DPSGDCallback

BATCHES = 4  # per epoch: 64 examples in batches of 16


class Line(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    return DataLoader(TensorDataset(x, 100 * x.sum(1, keepdim=True)), batch_size=16)


def fit(module: Line, callback: DPSGDCallback | None) -> float:
    """One epoch; returns how far the weights moved (L2)."""
    before = torch.cat([p.detach().clone().reshape(-1) for p in module.parameters()])
    pl.Trainer(
        max_epochs=1,
        callbacks=[callback] if callback is not None else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    ).fit(module, loader())
    after = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    return float((after - before).norm())


def hooks(module: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
        for m in module.modules()
    )


def test_every_fit_is_private_and_counted_and_leaves_no_hooks(tmp_path: Path) -> None:
    settings = LocalDP(noise_multiplier=0.5, max_grad_norm=1e-3)
    state = tmp_path / "dp.json"
    module = Line()
    assert fit(Line(), None) > 10  # the task's gradients are large: unclipped, it moves far
    # lr 1, 4 steps of a clipped mean (<= 1e-3) plus noise of std 0.5e-3 / 16 per
    # coordinate: the move stays far below 0.01 in every fit, the first and the later.
    callback = DPSGDCallback(settings, state, "c1")
    for n in (1, 2, 3):
        assert fit(module, callback) < 0.01
        assert callback.finish_round()["dp/steps"] == n * BATCHES
        assert hooks(module) == 0  # the module is as it was between fits
    expected = Accountant("rdp")
    expected.step(0.5, 1 / BATCHES, 3 * BATCHES)
    assert callback.epsilon == expected.epsilon(settings.delta)
    # A restarted client (a new callback on the same state file) carries on counting.
    again = DPSGDCallback(settings, state, "c1")
    assert fit(Line(), again) < 0.01
    assert again.finish_round()["dp/steps"] == 4 * BATCHES
