"""The two places where lightning_fed reaches into a Trainer beyond its typed API.

Both strategies install callbacks at ``setup`` time and restore a recovery
checkpoint that they choose only after talking to the other parties (so it cannot
be ``fit(ckpt_path=...)``). Keeping these calls here keeps the dependency on
Lightning's internals in one module, tested by both strategies' recovery tests.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


def callbacks_of(trainer: pl.Trainer) -> list[Callback]:
    """The Trainer's callback list (an attribute its type stubs do not declare)."""
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
    return callbacks


def restore_during_setup(trainer: pl.Trainer, path: str | os.PathLike[str]) -> None:
    """Load ``path``'s model and callback states now, from ``Strategy.setup``.

    Lightning restores the optimizers, schedulers and loop counters of the same
    checkpoint right after the strategy's ``setup``, as with ``fit(ckpt_path=path)``.
    The file is this party's own (it holds loop and callback state, not only
    tensors), so it is loaded with ``weights_only=False``: keep ``state_dir`` private.
    """
    connector = trainer._checkpoint_connector
    connector._restore_modules_and_callbacks(os.fspath(path), weights_only=False)
