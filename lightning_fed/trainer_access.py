"""Where lightning_fed reaches into a Trainer beyond its typed API, all in one module.

Both strategies install callbacks at ``setup`` time and restore a recovery
checkpoint that they choose only after talking to the other parties (so it cannot
be ``fit(ckpt_path=...)``); FedAvg clients validate the global model in the middle
of ``fit`` and read what it logged. Keeping these calls here keeps the dependency on
Lightning's internals in one module, tested by the recovery and federated
evaluation tests.
"""

from __future__ import annotations

import os
from typing import Any

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


def validate_inside_fit(trainer: pl.Trainer) -> None:
    """Run the validation loop now, from inside ``fit``, and return to training.

    This is what Lightning itself does between training batches
    (``val_check_interval``): flag the trainer as validating, run the loop, flag it
    as training again, and keep the logger connector's first-iteration marker.
    """
    loop = trainer.fit_loop.epoch_loop.val_loop
    connector = trainer._logger_connector
    first = getattr(connector, "_first_loop_iter", None)
    trainer.validating = True
    try:
        loop.run()
    finally:
        trainer.training = True
        if first is not None:
            connector._first_loop_iter = first


def logged_results(trainer: pl.Trainer) -> list[Any]:
    """What the running loop logged so far: Lightning's ``ResultMetric`` entries, each
    with ``meta.name``, ``is_tensor`` and ``value`` (a torchmetrics ``Metric`` when
    one was logged)."""
    results = getattr(trainer, "_results", None)
    return [] if results is None else list(results.values())
