"""The Lightning callbacks that ``FedAvgStrategy`` installs for each role.

They connect Lightning's loop to the protocol roles: the aggregator's epochs are
rounds; a client's epochs are its local training between instructions.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_fed.channel import Channel
from lightning_fed.fedavg import protocol as P
from lightning_fed.fedavg.aggregate import TensorSpec, spec_of
from lightning_fed.fedavg.aggregator import AggregatorRole
from lightning_fed.fedavg.client import ClientRole, Instruction
from lightning_fed.fedavg.errors import FedAvgError
from lightning_fed.fedavg.selection import federated_names
from lightning_fed.fedavg.weights import copy_state, federated_state, load_state
from lightning_fed.outputs import (
    save_report,
    save_weights,
    scalar_metrics,
    temporary_sibling,
)
from lightning_fed.trainer_access import restore_during_setup

if TYPE_CHECKING:
    from lightning_fed.fedavg.strategy import FedAvgStrategy

log = logging.getLogger(__name__)

RECOVERY_CHECKPOINT = "last-round.ckpt"


class _RoleHooks(Callback):
    """What both roles share: which tensors are federated, and their expected specs."""

    def __init__(self, strategy: FedAvgStrategy, channel: Channel, output_dir: Path) -> None:
        self.strategy = strategy
        self.config = strategy.config
        self.channel = channel
        self.output_dir = output_dir
        self.names: list[str] = []
        self.expected: dict[str, TensorSpec] = {}

    def _describe_model(self, module: pl.LightningModule) -> None:
        state = module.state_dict()
        self.names = federated_names(state, self.config.local_keys)
        if not self.names:
            raise FedAvgError(
                f"local_keys={list(self.config.local_keys)} keeps every tensor of the model "
                "local, so there is nothing to federate; hint: narrow the patterns"
            )
        self.expected = spec_of({k: state[k] for k in self.names})


class AggregatorHooks(_RoleHooks):
    """The aggregator's side: gather clients, run one round per epoch, publish the result."""

    def __init__(self, strategy: FedAvgStrategy, channel: Channel, output_dir: Path) -> None:
        super().__init__(strategy, channel, output_dir)
        self.role = AggregatorRole(channel, self.config)
        self.history: list[dict[str, Any]] = []
        self.trainer: pl.Trainer | None = None
        self.resumed_after = 0
        self._validated: dict[str, float] | None = None

    @property
    @override
    def state_key(self) -> str:
        return "FedAvgAggregator"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.channel.task.task_id,
            "clients": dict(self.role.clients),
            "history": list(self.history),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("task_id") != self.channel.task.task_id:
            raise FedAvgError(
                f"the recovery checkpoint belongs to task {state_dict.get('task_id')!r}, not "
                f"{self.channel.task.task_id!r}; hint: give each task its own state_dir"
            )
        self.role.clients = dict(state_dict.get("clients", {}))
        self.history = list(state_dict.get("history", []))
        self.resumed_after = len(self.history)

    def recovery_path(self, trainer: pl.Trainer) -> Path:
        return self.strategy.state_dir(trainer) / RECOVERY_CHECKPOINT

    def restore_if_possible(self, trainer: pl.Trainer) -> None:
        """Resume from the last completed round's checkpoint, if one exists."""
        path = self.recovery_path(trainer)
        if not path.is_file():
            log.info("aggregator: no recovery checkpoint at %s; starting at round 1", path)
            return
        # Lightning restores the optimizers and loop counters right after setup().
        restore_during_setup(trainer, path)
        log.warning(
            "aggregator: recovered from %s; resuming after round %d", path, self.resumed_after
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainer = trainer
        self._describe_model(pl_module)
        if self.resumed_after and self.role.clients:
            self.role.poll_checkins()
            log.info("aggregator: clients %s carry on", ", ".join(sorted(self.role.clients)))
        else:
            self.role.gather()

    def run_round(self) -> None:
        """One round: distribute, collect, average into the module, log."""
        trainer, module = self.trainer, self.strategy.lightning_module
        assert trainer is not None and module is not None
        round = trainer.current_epoch + 1
        result = self.role.run_round(round, federated_state(module, self.names), self.expected)
        copy_state(module, result.state)  # the mean of updates that passed update_problems
        self.history.append(result.summary())
        flat: dict[str, float] = {
            "fedavg/participants": float(len(result.samples)),
            "fedavg/samples": float(sum(result.samples.values())),
            "fedavg/round_seconds": result.seconds,
        }
        for client, n in result.samples.items():
            flat[f"clients/{client}/num_samples"] = float(n)
            for name, value in result.metrics.get(client, {}).items():
                flat[f"clients/{client}/{name}"] = value
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=round)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            pl_module.log("step", float(trainer.current_epoch + 1))  # the round is the x-axis
            self._validated = {}

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validated is not None:
            self._validated = scalar_metrics(trainer.callback_metrics)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated = None
        if trainer.current_epoch + 1 == self.config.rounds:
            trainer.check_val_every_n_epoch = 1  # the final global model is always validated

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        round = trainer.current_epoch + 1
        if not self.history or self.history[-1]["round"] != round:
            return
        metrics = self._validated or {}  # empty in rounds that log_rounds skips
        self.history[-1]["metrics"] = metrics
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        log.info(
            "aggregator: round %d/%d done (%d clients, %.2f s)%s",
            round,
            self.config.rounds,
            len(self.history[-1]["samples"]),
            self.history[-1]["seconds"],
            f": {shown}" if shown else "",
        )
        if self.config.recovery:
            path = self.recovery_path(trainer)
            tmp = temporary_sibling(path)
            trainer.save_checkpoint(tmp)
            os.replace(tmp, path)

    def report(self, trainer: pl.Trainer) -> dict[str, Any]:
        return {
            "task_id": self.channel.task.task_id,
            "aggregator": self.channel.node_id,
            "clients": sorted(self.role.clients),
            "rounds_planned": self.config.rounds,
            "rounds_completed": len(self.history),
            "rounds": self.history,
            "final_metrics": next(
                (r["metrics"] for r in reversed(self.history) if r.get("metrics")), {}
            ),
            "finished_at": time.time(),
        }

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = self.output_dir
        save_weights(pl_module.state_dict(), out / "final.safetensors")
        trainer.save_checkpoint(out / "final.ckpt")
        report = self.report(trainer)
        # Clients that ask for the final test's metrics wait for them only if one may come.
        report["test_expected"] = is_overridden("test_step", pl_module)
        save_report(report, out / "report.json")
        compact = {k: v for k, v in report.items() if k != "rounds"}
        self.role.finish(federated_state(pl_module, self.names), compact)
        self.strategy.final_report = report
        self.strategy._test_report_due = dict(self.role.clients)
        log.info("aggregator: final model and report in %s", out)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        try:
            self.role.abort(f"{type(exception).__name__}: {exception}")
        except Exception as exc:  # never hide the original failure
            log.warning("aggregator: could not tell the clients about the failure: %s", exc)


class ClientHooks(_RoleHooks):
    """A client's side: check in, train each round's epochs or steps, upload, follow.

    In epochs mode the round ends at the end of its last local epoch, and
    ``num_samples`` is the number of samples of that epoch (the local dataset's size).
    In steps mode it ends after the batch that completes its optimizer steps, and
    ``num_samples`` counts every sample trained in the round.
    """

    def __init__(self, strategy: FedAvgStrategy, channel: Channel, output_dir: Path) -> None:
        super().__init__(strategy, channel, output_dir)
        self.role = ClientRole(channel, self.config)
        self.epochs_left = 0
        self.steps_until: int | None = None  # the global_step that ends a steps round
        self.round_due = False  # steps mode: the round ends at this epoch's end
        self.finished = False
        self.seen = 0
        self.fit_started = time.monotonic()
        self._counted_batches = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._describe_model(pl_module)
        self.role.check_in()
        self._follow(trainer, pl_module, self.role.next_instruction())

    def _follow(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, instruction: Instruction
    ) -> None:
        source = f"aggregator {self.role.aggregator!r}"
        load_state(pl_module, instruction.tensors, self.expected, source)
        if instruction.kind == P.ROUND:
            start = instruction.start
            assert start is not None
            self.epochs_left = start.local_epochs
            self.steps_until = (
                None if start.local_steps is None else trainer.global_step + start.local_steps
            )
            self.seen = 0
            self.fit_started = time.monotonic()
            return
        self.finished = True
        trainer.should_stop = True
        out = self.output_dir
        save_weights(pl_module.state_dict(), out / "final.safetensors")
        save_report(instruction.report, out / "report.json")
        self.strategy.final_report = dict(instruction.report)
        assert self.role.aggregator is not None
        self.strategy._finished_as = (self.role.aggregator, self.role.instance)
        log.info("client %s: federation finished; final model in %s", self.channel.node_id, out)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.steps_until is None:
            self.seen = 0  # epochs mode: weigh by the last epoch's samples

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.finished:
            return
        try:
            self.seen += extract_batch_size(batch)
        except Exception:
            if not self._counted_batches:
                log.warning("client: cannot infer batch sizes; weighting by batch count")
                self._counted_batches = True
            self.seen += 1
        if self.steps_until is not None and trainer.global_step >= self.steps_until:
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                # The epoch's validation and epoch-level metrics come after this hook:
                # end the round in on_train_epoch_end, with them, on this round's model.
                self.round_due = True
            else:
                self._end_round(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.finished:
            return
        if self.steps_until is not None:
            if self.round_due:
                self.round_due = False
                self._end_round(trainer, pl_module)
            return
        self.epochs_left -= 1
        if self.epochs_left <= 0:
            self._end_round(trainer, pl_module)

    def _end_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Upload this round's tensors, then wait for and follow the next instruction."""
        if self.seen < 1:
            raise FedAvgError(
                f"client {self.channel.node_id!r} trained on no samples this round; hint: "
                "check its train_dataloader and limit_train_batches"
            )
        metrics = scalar_metrics(trainer.callback_metrics)
        metrics["fit_seconds"] = time.monotonic() - self.fit_started  # local training time
        self.role.upload(federated_state(pl_module, self.names), self.seen, metrics)
        current = self.role.current
        log.info(
            "client %s: round %s trained on %d samples%s",
            self.channel.node_id,
            "?" if current is None else current.round,
            self.seen,
            "".join(f", {k}={v:.4g}" for k, v in sorted(metrics.items())),
        )
        self._follow(trainer, pl_module, self.role.next_instruction())
