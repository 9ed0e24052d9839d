"""The Lightning callbacks that ``FedAvgStrategy`` installs for each role.

They connect Lightning's loop to the protocol roles: the aggregator's epochs are
rounds; a client's epochs are its local training between instructions.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_fed.algorithms import (
    Algorithm,
    ClientAlgorithm,
    ClientRound,
    ModelSpec,
    algorithm_from,
)
from lightning_fed.algorithms.aggregate import TensorSpec, update_problems
from lightning_fed.algorithms.base import EXTRA, AlgorithmError, split_extras, with_extras
from lightning_fed.channel import Channel
from lightning_fed.fedavg import protocol as P
from lightning_fed.fedavg.aggregator import AggregatorRole
from lightning_fed.fedavg.client import ClientRole, Instruction
from lightning_fed.fedavg.config import FedAvgConfig
from lightning_fed.fedavg.errors import FedAvgError
from lightning_fed.fedavg.evaluation import Evaluation, merge, validate_now
from lightning_fed.fedavg.selection import federated_names
from lightning_fed.fedavg.weights import copy_state, federated_state, load_state
from lightning_fed.outputs import (
    peak_rss_bytes,
    save_report,
    save_weights,
    scalar_metrics,
    temporary_sibling,
)
from lightning_fed.trainer_access import callbacks_of, restore_during_setup

log = logging.getLogger(__name__)

RECOVERY_CHECKPOINT = "last-round.ckpt"


@dataclass
class Outcome:
    """What a party's fit leaves for its strategy to read (the hooks write only here).

    Attributes:
        final_report: the federation's report once ``fit`` ended.
        finished_as: client: ``(aggregator, instance)`` of the finish it received.
        test_report_due: aggregator: the client instances to send the final test's
            metrics to.
    """

    final_report: dict[str, Any] | None = None
    finished_as: tuple[str, str] | None = None
    test_report_due: dict[str, str] | None = field(default=None)
    test_sent: bool = False  # client: its test of the final model went to the aggregator


@dataclass(frozen=True)
class Party:
    """Where a party's hooks work: its settings, channel and folders."""

    config: FedAvgConfig
    channel: Channel
    output_dir: Path
    state_dir: Path


class _RoleHooks(Callback):
    """What both roles share: which tensors are federated, and their expected specs."""

    def __init__(self, party: Party, outcome: Outcome) -> None:
        self.party = party
        self.config = party.config
        self.channel = party.channel
        self.output_dir = party.output_dir
        self.outcome = outcome
        self.names: list[str] = []
        self.expected: dict[str, TensorSpec] = {}
        self.model = ModelSpec({}, frozenset())

    def _describe_model(self, module: pl.LightningModule) -> None:
        state = module.state_dict()
        self.names = federated_names(state, self.config.local_keys)
        if not self.names:
            raise FedAvgError(
                f"local_keys={list(self.config.local_keys)} keeps every tensor of the model "
                "local, so there is nothing to federate; hint: narrow the patterns"
            )
        odd = [n for n in self.names if n.startswith(EXTRA)]
        if odd:
            raise FedAvgError(
                f"the model's state has tensors named {odd[:3]}; names starting with "
                f"{EXTRA!r} are reserved for algorithms' tensors; hint: rename the submodule"
            )
        self.model = ModelSpec.of(module, self.names)
        self.expected = dict(self.model.tensors)

    def detach(self, trainer: pl.Trainer) -> None:
        """Remove these hooks (and what they installed) from the trainer's callbacks."""
        if self in callbacks_of(trainer):
            callbacks_of(trainer).remove(self)


class AggregatorHooks(_RoleHooks):
    """The aggregator's side: gather clients, run one round per epoch, publish the result."""

    def __init__(self, party: Party, outcome: Outcome, algorithm: Algorithm) -> None:
        super().__init__(party, outcome)
        self.algorithm = algorithm
        self.role = AggregatorRole(party.channel, self.config, algorithm=algorithm)
        self.history: list[dict[str, Any]] = []
        self.resumed_after = 0
        self._validated: dict[str, float] | None = None
        self._restored_algorithm: dict[str, Any] | None = None
        self.initial_federated: dict[str, float] = {}

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
            "algorithm": {**self.algorithm.describe(), "state": self.algorithm.state_dict()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("task_id") != self.channel.task.task_id:
            raise FedAvgError(
                f"the recovery checkpoint belongs to task {state_dict.get('task_id')!r}, not "
                f"{self.channel.task.task_id!r}; hint: give each task its own state_dir"
            )
        saved = state_dict.get("algorithm", {"name": "fedavg", "params": {}, "state": {}})
        described = self.algorithm.describe()
        if {k: saved.get(k) for k in ("name", "params")} != described:
            raise FedAvgError(
                f"the recovery checkpoint was made by algorithm {saved.get('name')!r} with "
                f"{saved.get('params')!r}, this run has {described['name']!r} with "
                f"{described['params']!r}; hint: restart with the same algorithm, or give "
                "the new run its own state_dir"
            )
        self.role.clients = dict(state_dict.get("clients", {}))
        self.history = list(state_dict.get("history", []))
        self.resumed_after = len(self.history)
        self._restored_algorithm = dict(saved.get("state", {}))

    def recovery_path(self, trainer: pl.Trainer) -> Path:
        return self.party.state_dir / RECOVERY_CHECKPOINT

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
        self._describe_model(pl_module)
        self.algorithm.setup(self.model, self.role.expected_clients)
        if self._restored_algorithm is not None:
            self.algorithm.load_state_dict(self._restored_algorithm)
            self._restored_algorithm = None
        log.info("aggregator: algorithm %r", self.algorithm)
        if self.resumed_after and self.role.clients:
            self.role.poll_checkins()
            log.info("aggregator: clients %s carry on", ", ".join(sorted(self.role.clients)))
        else:
            self.role.gather()

    def run_round(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """One round: distribute, collect, fold, make the new global model, log."""
        round = trainer.current_epoch + 1
        current = federated_state(module, self.names)
        result = self.role.run_round(round, current, self.expected)
        new = self.algorithm.server_update(current, result.aggregate)
        problems = update_problems(self.expected, new)
        if problems:
            raise FedAvgError(
                f"round {round}: algorithm {self.algorithm!r} made a global model that does "
                f"not fit: {'; '.join(problems[:5])}; hint: lower its learning rate"
            )
        copy_state(module, new)
        del current, new
        self.history.append(result.summary())
        if result.evaluations:  # the clients' validation of the model this round started from
            self._record_federated(trainer, module, round - 1, result.evaluations)
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

    def report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        local: dict[str, float] = next(
            (r["metrics"] for r in reversed(self.history) if r.get("metrics")), {}
        )
        federated: dict[str, float] = next(
            (r["federated_metrics"] for r in reversed(self.history) if r.get("federated_metrics")),
            {},
        )
        datamodule = getattr(trainer, "datamodule", None)
        return {
            "task_id": self.channel.task.task_id,
            "aggregator": self.channel.node_id,
            "clients": sorted(self.role.clients),
            "algorithm": self.algorithm.describe(),
            "rounds_planned": self.config.rounds,
            "rounds_completed": len(self.history),
            "rounds": self.history,
            # the aggregator's own validation; the clients' when it holds no data
            "final_metrics": local or federated,
            "final_federated_metrics": federated,
            "initial_federated_metrics": self.initial_federated,
            # Clients that ask for the final test's metrics wait only if one may come.
            "test_expected": self.config.evaluate_on_clients
            or (
                is_overridden("test_step", pl_module)
                and (datamodule is None or is_overridden("test_dataloader", datamodule))
            ),
            "federated_test_expected": self.config.evaluate_on_clients,
            "peak_rss_bytes": peak_rss_bytes(),  # this aggregator process's, so far
            "finished_at": time.time(),
        }

    def _record_federated(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        round: int,
        evaluations: Mapping[str, Evaluation],
    ) -> None:
        """Merge the clients' validations of round ``round``'s model; log and keep them."""
        merged, exact = merge(module, evaluations.items())
        if not merged:
            return
        for logger in trainer.loggers:
            logger.log_metrics({f"federated/{k}": v for k, v in merged.items()}, step=round)
        entry = next((h for h in self.history if h["round"] == round), None)
        if entry is None:
            self.initial_federated = merged  # round 0: the model before any round
        else:
            entry["federated_metrics"] = merged
            entry["federated_exact"] = exact
            entry["federated_clients"] = sorted(evaluations)
        log.info(
            "aggregator: federated validation of round %d's model by %d clients: %s",
            round,
            len(evaluations),
            ", ".join(f"{k}={v:.4g}" for k, v in sorted(merged.items())),
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = self.output_dir
        save_weights(pl_module.state_dict(), out / "final.safetensors")
        trainer.save_checkpoint(out / "final.ckpt")
        report = self.report(trainer, pl_module)
        save_report(report, out / "report.json")
        compact = {k: v for k, v in report.items() if k != "rounds"}
        final_round = len(self.history) if self.config.evaluate_on_clients else None
        self.role.finish(federated_state(pl_module, self.names), compact, final_round)
        if final_round is not None:
            evaluations = self.role.collect_evaluations(final_round)
            self._record_federated(trainer, pl_module, final_round, evaluations)
            report = self.report(trainer, pl_module)
            save_report(report, out / "report.json")
        self.outcome.final_report = report
        self.outcome.test_report_due = dict(self.role.clients)
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

    def __init__(self, party: Party, outcome: Outcome) -> None:
        super().__init__(party, outcome)
        self.role = ClientRole(party.channel, self.config)
        self.algorithm: ClientAlgorithm | None = None
        self._algorithm_key: str | None = None  # the description it was built from
        self._algorithm_name = ""
        self._evaluation: Evaluation | None = None  # to send with this round's update
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
        model, extras = split_extras(instruction.tensors)
        load_state(pl_module, model, self.expected, source)
        if instruction.kind == P.ROUND:
            start = instruction.start
            assert start is not None
            self._evaluation = (
                self._validate(trainer, instruction.round - 1) if start.evaluate else None
            )
            self._start_algorithm(trainer, pl_module, start, instruction.round, model, extras)
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
        self.outcome.final_report = dict(instruction.report)
        assert self.role.aggregator is not None
        self.outcome.finished_as = (self.role.aggregator, self.role.instance)
        log.info("client %s: federation finished; final model in %s", self.channel.node_id, out)
        if instruction.evaluate_round is not None:  # the aggregator waits for every answer
            evaluation = self._validate(trainer, instruction.evaluate_round) or Evaluation(
                instruction.evaluate_round, 0, {}
            )
            body, states = evaluation.encode()
            self.role.send_evaluation(body, states)

    def _validate(self, trainer: pl.Trainer, round: int) -> Evaluation | None:
        """Validate the global model just loaded on this client's data (None: no data)."""
        evaluation = validate_now(trainer, round)
        if evaluation is not None:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(evaluation.metrics.items()))
            log.info(
                "client %s: validated the global model of round %d on %d samples: %s",
                self.channel.node_id,
                round,
                evaluation.samples,
                shown or "nothing logged",
            )
        return evaluation

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
        extras = {} if self.algorithm is None else self.algorithm.finish_round(pl_module)
        if self.algorithm is not None:
            self._save_algorithm_state()
        tensors = with_extras(federated_state(pl_module, self.names), extras)
        evaluation, self._evaluation = self._evaluation, None
        body = None
        if evaluation is not None:
            body, states = evaluation.encode()
            tensors.update(states)
        self.role.upload(tensors, self.seen, metrics, body)
        del tensors, extras
        current = self.role.current
        log.info(
            "client %s: round %s trained on %d samples%s",
            self.channel.node_id,
            "?" if current is None else current.round,
            self.seen,
            "".join(f", {k}={v:.4g}" for k, v in sorted(metrics.items())),
        )
        self._follow(trainer, pl_module, self.role.next_instruction())

    # -- the algorithm's client side ------------------------------------------------------
    def _start_algorithm(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        start: P.RoundStart,
        round: int,
        model: Mapping[str, torch.Tensor],
        extras: Mapping[str, torch.Tensor],
    ) -> None:
        """Install (once, or anew when the aggregator changed it) and start the client side."""
        key = json.dumps(start.algorithm, sort_keys=True)
        if key != self._algorithm_key:
            self._remove_algorithm(trainer)
            try:
                algorithm = algorithm_from(start.algorithm)
            except AlgorithmError as exc:
                raise FedAvgError(str(exc)) from None
            client = algorithm.client()
            if client is not None:
                self._load_algorithm_state(client, algorithm.name)
                callbacks_of(trainer).append(client)
            self.algorithm, self._algorithm_key = client, key
            self._algorithm_name = algorithm.name
            log.info("client %s: algorithm %r", self.channel.node_id, algorithm)
        if self.algorithm is not None:
            self.algorithm.start_round(ClientRound(round, pl_module, self.model, model, extras))

    def _remove_algorithm(self, trainer: pl.Trainer) -> None:
        if self.algorithm is not None and self.algorithm in callbacks_of(trainer):
            callbacks_of(trainer).remove(self.algorithm)
        self.algorithm, self._algorithm_key = None, None

    def _algorithm_state_path(self, name: str) -> Path:
        return self.party.state_dir / f"algorithm-{name}.pt"

    def _load_algorithm_state(self, client: ClientAlgorithm, name: str) -> None:
        path = self._algorithm_state_path(name)
        if path.is_file():
            client.load_state_dict(torch.load(path, weights_only=True))
            log.info("client %s: restored %s's state from %s", self.channel.node_id, name, path)

    def _save_algorithm_state(self) -> None:
        assert self.algorithm is not None
        state = self.algorithm.state_dict()
        if not state:
            return
        path = self._algorithm_state_path(self._algorithm_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(path)
        torch.save(state, tmp)
        os.replace(tmp, path)

    @override
    def detach(self, trainer: pl.Trainer) -> None:
        self._remove_algorithm(trainer)
        super().detach(trainer)
