"""The aggregator's progress bar: one bar over the rounds, with the global metrics."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override


class RoundProgressBar(TQDMProgressBar):
    """A TQDM bar that advances once per federated round (= one aggregator epoch)."""

    def __init__(self, rounds: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds = rounds

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=self.rounds)
        self.train_progress_bar.initial = 0
        self.train_progress_bar.n = trainer.current_epoch
        self.train_progress_bar.set_description("Rounds")
        self.train_progress_bar.refresh()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar for the whole federation

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        pass

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bar = self.train_progress_bar
        bar.n = trainer.current_epoch + 1
        bar.set_postfix(self.get_metrics(trainer, pl_module))
        bar.refresh()

    def _round_validation(self, trainer: pl.Trainer) -> bool:
        return trainer.state.fn == "fit" and not trainer.sanity_checking

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._round_validation(trainer):  # a round's validation shows in the round bar
            super().on_validation_start(trainer, pl_module)

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._round_validation(trainer):
            super().on_validation_batch_start(trainer, *args, **kwargs)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._round_validation(trainer):
            super().on_validation_batch_end(trainer, *args, **kwargs)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._round_validation(trainer):
            super().on_validation_end(trainer, pl_module)
