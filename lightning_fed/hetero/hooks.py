"""The Lightning callback that ``HeteroNNStrategy`` installs on every party.

It ties Lightning's loop to the HeteroNN protocol where a user's module hooks
could get in the way (a user who overrides ``on_train_epoch_end`` need not call
``super()``):

- the host's word to the collaborators: go on (at the next epoch's start) or stop
  (when its training ends, for whatever reason: ``max_epochs``, ``EarlyStopping``,
  ``max_time``, ``max_steps``); a collaborator waits for it at each epoch's end;
- recovery checkpoints at each completed epoch (see :mod:`.recovery`);
- the party's report: per epoch, its wall time (and the training part of it, before
  validation), batches, time in the exchange and bytes moved, and the metrics;
  written as ``report.json`` in the output folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_fed.hetero.link import CollaboratorLink, HeteroError, HostLink
from lightning_fed.hetero.recovery import save_epoch
from lightning_fed.outputs import save_report, scalar_metrics

log = logging.getLogger(__name__)


class HeteroHooks(Callback):
    """Epoch words, recovery checkpoints and the report of one HeteroNN party.

    Args:
        link: this party's exchange (its role follows from the link's type).
        task_id: the task, recorded in checkpoints and the report.
        ids_digest: digest of the common IDs; a checkpoint of other IDs is refused.
        state_dir: where recovery checkpoints go; None saves none.
        output_dir: where ``report.json`` goes.
        alignment: facts of the alignment for the report (sizes, PSI seconds).
    """

    def __init__(
        self,
        link: HostLink | CollaboratorLink,
        *,
        task_id: str,
        ids_digest: str,
        state_dir: Path | None,
        output_dir: Path,
        alignment: dict[str, Any],
    ) -> None:
        self.link = link
        self.task_id = task_id
        self.ids_digest = ids_digest
        self.state_dir = state_dir
        self.output_dir = output_dir
        self.alignment = alignment
        self.epochs: list[dict[str, Any]] = []
        self.resumed_after: int | None = None
        self.test_metrics: dict[str, float] = {}
        self._word_due: int | None = None  # host: the epoch whose "go on" is not sent yet
        self._start: dict[str, Any] = {}

    @property
    def is_host(self) -> bool:
        return isinstance(self.link, HostLink)

    # -- checkpoint state ---------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        return "HeteroNN"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "ids": self.ids_digest, "epochs": list(self.epochs)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("task_id") != self.task_id:
            raise HeteroError(
                f"the recovery checkpoint belongs to task {state_dict.get('task_id')!r}, not "
                f"{self.task_id!r}; hint: give each task its own state_dir"
            )
        if state_dict.get("ids") != self.ids_digest:
            raise HeteroError(
                "the recovery checkpoint was trained on other common IDs than this run's "
                "intersection (a party's data changed); hint: restart without recovery, or "
                "restore the data the run started with"
            )
        self.epochs = list(state_dict.get("epochs", []))
        self.resumed_after = len(self.epochs) - 1 if self.epochs else None

    # -- epochs -------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.link, HostLink) and self._word_due is not None:
            self.link.announce(self._word_due, stop=False)
            self._word_due = None
        traffic = self.link.channel.traffic
        self._start = {
            "time": time.perf_counter(),
            "link": self.link.seconds,
            "sent": traffic.bytes_sent,
            "received": traffic.bytes_received,
            "phases": dict(self.link.phases),
            "batches": 0,
        }

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if self._start:
            self._start["batches"] += 1
            self._start["trained"] = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        start, self._start = self._start, {}
        stopped = isinstance(self.link, CollaboratorLink) and self.link.stopped
        if not start or stopped or start["batches"] != trainer.num_training_batches:
            return  # an epoch cut short is neither recorded nor checkpointed
        traffic = self.link.channel.traffic
        record = {
            "epoch": epoch,
            "seconds": time.perf_counter() - start["time"],
            "train_seconds": start["trained"] - start["time"],
            "batches": start["batches"],
            "exchange_seconds": self.link.seconds - start["link"],
            "bytes_sent": traffic.bytes_sent - start["sent"],
            "bytes_received": traffic.bytes_received - start["received"],
            "phases": {k: v - start["phases"].get(k, 0.0) for k, v in self.link.phases.items()},
            "metrics": scalar_metrics(trainer.callback_metrics),
        }
        self.epochs.append(record)
        self.link.channel.prune_sent()  # blobs every recipient has read
        if self.state_dir is not None:
            save_epoch(trainer, self.state_dir, epoch)
        if isinstance(self.link, HostLink):
            self._word_due = epoch  # sent when the next epoch starts, or as a stop
        elif self.link.epoch_ended(epoch):
            trainer.should_stop = True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.link, HostLink):
            last = self._word_due if self._word_due is not None else trainer.current_epoch
            self.link.announce(last, stop=True)
            self._word_due = None
        self.write_report()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_host:
            metrics = scalar_metrics(trainer.callback_metrics)
            self.test_metrics = {k: v for k, v in metrics.items() if k.startswith("test")}
        self.write_report()

    # -- report -------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """This party's report (also written as ``report.json``)."""
        channel = self.link.channel
        return {
            "task_id": self.task_id,
            "node_id": channel.node_id,
            "role": "host" if self.is_host else "collaborator",
            **self.alignment,
            "resumed_after_epoch": self.resumed_after,
            "epochs": self.epochs,
            "test_metrics": self.test_metrics,
            "traffic": vars(channel.traffic.copy()),
            "finished_at": time.time(),
        }

    def write_report(self) -> Path:
        path = save_report(self.report(), self.output_dir / "report.json")
        log.info("%s: report in %s", self.link.channel.node_id, path)
        return path
