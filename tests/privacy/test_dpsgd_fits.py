"""Local DP-SGD across several fits of one process (the callback a LocalDP client adds to
its Trainer, driven by real Lightning Trainers): every fit clips and noises, the
accountant keeps counting, and each fit leaves the module without Opacus' hooks; the
batches are Poisson samples, as the accountant assumes, drawn from a secret seed."""

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
        self.batch_sizes: list[int] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        self.batch_sizes.append(len(x))
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


def loader(examples: int = 64) -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(examples, 8, generator=g)
    return DataLoader(TensorDataset(x, 100 * x.sum(1, keepdim=True)), batch_size=16)


def fit(module: Line, callback: DPSGDCallback | None, examples: int = 64) -> float:
    """One epoch (through the callback's sampler, as FedAvgStrategy hands it the
    dataloader); returns how far the weights moved (L2)."""
    data = loader(examples) if callback is None else callback.sampling_loader(loader(examples))
    before = torch.cat([p.detach().clone().reshape(-1) for p in module.parameters()])
    pl.Trainer(
        max_epochs=1,
        callbacks=[callback] if callback is not None else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    ).fit(module, data)
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


def test_batches_are_poisson_samples_from_a_secret_seed(tmp_path: Path) -> None:
    """4,000 examples in batches of 16: each example joins each of the 250 batches with
    probability 1/250, so the sizes vary around 16 with the binomial spread, and two
    clients seeded alike draw different batches. Without Poisson sampling the batches
    are the dataloader's own (all of 16)."""
    sizes = []
    for _ in range(2):
        torch.manual_seed(0)  # as seed_everything on every client
        module = Line()
        callback = DPSGDCallback(LocalDP(noise_multiplier=1.0), tmp_path / "a.json", "c1")
        fit(module, callback, examples=4000)
        sizes.append(module.batch_sizes)
    first = torch.tensor(sizes[0], dtype=torch.float64)
    assert len(first) == 250
    assert abs(first.mean().item() - 16) < 1.5  # 6 standard errors of the mean
    assert 2.5 < first.std().item() < 5.5  # binomial: sqrt(4000 * q * (1 - q)) = 3.99
    assert sizes[0] != sizes[1]
    fixed = Line()
    settings = LocalDP(noise_multiplier=1.0, poisson_sampling=False)
    fit(fixed, DPSGDCallback(settings, tmp_path / "b.json", "c1"), examples=4000)
    assert set(fixed.batch_sizes) == {16}
