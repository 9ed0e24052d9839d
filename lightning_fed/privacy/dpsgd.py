"""Local DP-SGD on a client: Opacus' per-example clipping and noise inside Lightning's loop.

:class:`DPSGDCallback` turns a client's unchanged LightningModule into a DP-SGD learner
for the run: Opacus' ``GradSampleModule`` hooks compute per-example gradients on the
module's own layers, and the Trainer's optimizer is wrapped in Opacus' ``DPOptimizer``,
which clips each example's gradient to ``max_grad_norm``, sums, adds Gaussian noise of
standard deviation ``noise_multiplier * max_grad_norm`` and averages over the expected
batch size before every step. Each step is counted by an
:class:`~lightning_fed.privacy.accounting.Accountant` (sample rate ``1 / batches per
epoch``), whose history is kept in the client's state folder so that a restarted
client carries on counting.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_fed.errors import SettingError
from lightning_fed.privacy.accounting import Accountant, require_opacus
from lightning_fed.privacy.dp import noise_generator
from lightning_fed.privacy.dp_settings import LocalDP

log = logging.getLogger(__name__)


def module_problems(module: Any) -> list[str]:
    """What keeps Opacus from computing per-example gradients of ``module`` (empty: none)."""
    validator = require_opacus("opacus.validators").ModuleValidator
    return [str(e) for e in validator.validate(module, strict=False)]


class DPSGDCallback(Callback):
    """Local DP-SGD for one client's fit (see :class:`~lightning_fed.privacy.LocalDP`).

    Args:
        settings: the client's :class:`~lightning_fed.privacy.LocalDP`.
        state_file: where the accountant's history is kept between rounds and restarts.
        node: the client's node id (for messages).
    """

    def __init__(self, settings: LocalDP, state_file: Path, node: str) -> None:
        self.settings = settings
        self.state_file = state_file
        self.node = node
        self.accountant = Accountant(settings.accountant)
        self.sample_rate = 1.0
        self.round_steps = 0  # optimizer steps of the current round
        self.stopping_reason: str | None = None
        self._grad_sample: Any = None
        self._expected_batch: int | None = None  # the Poisson loader's mean batch size

    # -- setting up ---------------------------------------------------------------------------
    def sampling_loader(self, dataloader: Any) -> Any:
        """The train dataloader the client trains on: with ``poisson_sampling``, Opacus'
        ``DPDataLoader`` over the same dataset (each example in a batch with probability
        ``1 / len(dataloader)``, from a generator seeded by ``os.urandom``: Lightning's
        ``seed_everything`` would make the global one known), else ``dataloader``.

        Raises:
            SettingError: the dataloader cannot be Poisson-sampled.
        """
        if not self.settings.poisson_sampling:
            return dataloader
        from torch.utils.data import DataLoader, IterableDataset

        hint = (
            "hint: give the train dataloader a map-style dataset, or "
            "LocalDP(poisson_sampling=False)"
        )
        iterable = isinstance(getattr(dataloader, "dataset", None), IterableDataset)
        if not isinstance(dataloader, DataLoader) or iterable:
            dataset = type(getattr(dataloader, "dataset", None)).__name__
            raise SettingError(
                f"client {self.node!r}: LocalDP's Poisson sampling draws examples from a "
                f"torch DataLoader over a map-style dataset; the train dataloader is "
                f"{type(dataloader).__name__} over {dataset}; {hint}"
            )
        batch_size = self._batch_size(dataloader.batch_size)
        try:
            loader = require_opacus("opacus.data_loader").DPDataLoader.from_data_loader(
                dataloader, generator=noise_generator()
            )
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise SettingError(
                f"client {self.node!r}: LocalDP's Poisson sampling cannot wrap the train "
                f"dataloader ({type(exc).__name__}: {exc}); {hint}"
            ) from None
        self._expected_batch = batch_size
        return loader

    def _batch_size(self, value: object) -> int:
        """The train dataloader's ``batch_size``: Opacus averages each noised sum over it
        (with Poisson sampling, the batches' mean size).

        Raises:
            SettingError: it is not a whole number >= 1.
        """
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SettingError(
                f"client {self.node!r}: LocalDP needs the train dataloader's batch_size "
                f"(Opacus averages the noised sum over it), got {value!r}; hint: give the "
                "train dataloader a batch_size"
            )
        return value

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        problems = module_problems(pl_module)
        if problems:
            raise SettingError(
                f"client {self.node!r}: LocalDP cannot compute per-example gradients of "
                f"{type(pl_module).__name__}: {'; '.join(problems[:5])}; hint: replace "
                "BatchNorm with GroupNorm (opacus.validators.ModuleValidator.fix(model) "
                "does it), or leave LocalDP off this client"
            )
        if not pl_module.automatic_optimization:
            raise SettingError(
                f"client {self.node!r}: LocalDP needs automatic optimization (Opacus wraps the "
                "optimizer Lightning steps); hint: let Lightning step one optimizer"
            )
        if trainer.accumulate_grad_batches != 1:
            raise SettingError(
                f"client {self.node!r}: LocalDP with accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}: each optimizer step must see one batch "
                "for the accounting; hint: raise the batch size instead"
            )
        if trainer.world_size > 1:
            raise SettingError(
                f"client {self.node!r}: LocalDP inside a DDP party is not supported yet; "
                "hint: run the client on one device"
            )
        if str(trainer.precision) == "16-mixed":
            raise SettingError(
                f"client {self.node!r}: LocalDP with precision='16-mixed': the gradient scaler "
                "unscales the summed gradient, not the per-example ones Opacus clips; hint: "
                "use precision='bf16-mixed' or '32-true'"
            )
        self._close()  # hooks left by a fit that failed
        self._grad_sample = require_opacus().GradSampleModule(pl_module, batch_first=True)
        self._load()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise SettingError(
                f"client {self.node!r}: LocalDP wraps one optimizer, and "
                f"{type(pl_module).__name__}.configure_optimizers returns {len(optimizers)}"
            )
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches < 1:
            raise SettingError(
                f"client {self.node!r}: LocalDP needs a sized train dataloader (the sample "
                f"rate is 1 / batches per epoch), got {batches!r} batches"
            )
        if not self.settings.poisson_sampling:
            batch_size = self._batch_size(getattr(trainer.train_dataloader, "batch_size", None))
        elif self._expected_batch is None:
            raise SettingError(
                f"client {self.node!r}: LocalDP(poisson_sampling=True) but the train "
                "dataloader was not handed to its Poisson sampler (the client's strategy "
                "does that); hint: train with FedAvgStrategy, or poisson_sampling=False"
            )
        else:
            batch_size = self._expected_batch
        self.sample_rate = 1.0 / batches
        target = self.settings.target_epsilon
        if target is not None and self.accountant.steps == 0:
            first = self.accountant.epsilon_after(
                self.settings.delta, self.settings.noise_multiplier, self.sample_rate, batches
            )
            if first > target:
                raise SettingError(
                    f"client {self.node!r}: LocalDP: one epoch of {batches} steps already "
                    f"spends epsilon {first:.4g} > target_epsilon={target:g} (delta "
                    f"{self.settings.delta:g}); hint: raise noise_multiplier"
                )
        wrapped = require_opacus("opacus.optimizers").DPOptimizer(
            optimizers[0],
            noise_multiplier=self.settings.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            # Not the global generator, which Lightning's seed_everything makes the same
            # on every client running one script (and known to whoever knows the seed).
            generator=noise_generator(device=pl_module.device),
        )
        wrapped.attach_step_hook(self._count)
        trainer.strategy.optimizers = [wrapped]
        log.info(
            "client %s: local DP-SGD with noise multiplier %g, max_grad_norm %g, %d batches of "
            "%s%d per epoch (sample rate %.4g); epsilon so far %.4g (delta %g)",
            self.node,
            self.settings.noise_multiplier,
            self.settings.max_grad_norm,
            batches,
            "Poisson-sampled, on average " if self.settings.poisson_sampling else "",
            batch_size,
            self.sample_rate,
            self.epsilon,
            self.settings.delta,
        )

    def _count(self, optimizer: Any) -> None:
        self.accountant.step(self.settings.noise_multiplier, self.sample_rate)
        self.round_steps += 1

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.accountant.steps:
            self._save()  # every step taken counts, whatever stopped the fit
        self._close()

    def _close(self) -> None:
        if self._grad_sample is not None:
            self._grad_sample._close()  # removes the hooks; the module is as it was
            self._grad_sample = None

    # -- rounds ------------------------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon(self.settings.delta)

    def finish_round(self) -> dict[str, float]:
        """After a round's training: save the history, decide whether to stop, and return
        the metrics sent with the update (``dp/epsilon``, ``dp/steps``)."""
        self._save()
        steps, self.round_steps = self.round_steps, 0
        epsilon = self.epsilon
        target = self.settings.target_epsilon
        if target is not None and steps:
            ahead = self.accountant.epsilon_after(
                self.settings.delta, self.settings.noise_multiplier, self.sample_rate, steps
            )
            if ahead > target:
                self.stopping_reason = (
                    f"LocalDP: target_epsilon={target:g} reached: epsilon is {epsilon:.4g} and "
                    f"another round would spend {ahead:.4g} (delta {self.settings.delta:g})"
                )
        out = {"dp/steps": float(self.accountant.steps)}
        if math.isfinite(epsilon):
            out["dp/epsilon"] = epsilon
        return out

    # -- the accountant's file ----------------------------------------------------------------
    def _load(self) -> None:
        if not self.state_file.is_file():
            return
        state = json.loads(self.state_file.read_text())
        self.accountant = Accountant.from_state(state)
        log.info(
            "client %s: local DP-SGD carries on from %d steps already spent (epsilon %.4g)",
            self.node,
            self.accountant.steps,
            self.epsilon,
        )

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(self.accountant.state_dict()))
        os.replace(tmp, self.state_file)
