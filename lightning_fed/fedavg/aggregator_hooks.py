"""The aggregator's Lightning callback: its epochs are the rounds.

Under DDP (``FedAvgStrategy(..., strategy="ddp")``) the aggregator runs one process per
device: global rank 0 gathers the clients, runs each round and makes the new global
model, which reaches the other ranks through the process group; every rank then
validates (and tests) its shard of the holdout with the same weights, as in plain
Lightning DDP. Only rank 0 writes the report and the final weights.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_fed.algorithms import (
    Algorithm,
)
from lightning_fed.algorithms.aggregate import update_problems
from lightning_fed.fedavg.aggregator import AggregatorRole, RoundResult
from lightning_fed.fedavg.dp_aggregator import PrivateRounds
from lightning_fed.fedavg.errors import FedAvgError
from lightning_fed.fedavg.evaluation import Evaluation, merge
from lightning_fed.fedavg.hooks import RECOVERY_CHECKPOINT, Outcome, Party, RoleHooks
from lightning_fed.fedavg.selection import participants_per_round
from lightning_fed.fedavg.weights import copy_state, federated_state
from lightning_fed.outputs import (
    peak_rss_bytes,
    save_report,
    save_weights,
    scalar_metrics,
    temporary_sibling,
)
from lightning_fed.privacy.dp_settings import DifferentialPrivacy
from lightning_fed.ranks import PEER_REASON_WAIT, Ranks, broke_collective, peer_reason
from lightning_fed.trainer_access import restore_during_setup

log = logging.getLogger(__name__)

#: The aggregator's differential-privacy accounting, written after every round (recovery).
PRIVACY_LEDGER = "dp-ledger.json"


class AggregatorHooks(RoleHooks):
    """The aggregator's side: gather clients, run one round per epoch, publish the result.

    Args:
        party: where it works (its channel on global rank 0 only).
        outcome: what the fit leaves for the strategy.
        algorithm: the federated algorithm (its server side runs on rank 0).
        ranks: the aggregator's processes (one without DDP).
    """

    def __init__(self, party: Party, outcome: Outcome, algorithm: Algorithm, ranks: Ranks) -> None:
        super().__init__(party, outcome)
        self.algorithm = algorithm
        self.ranks = ranks
        dp = self.config.differential_privacy
        #: differential privacy across rounds (rank 0), if the run has it
        self.privacy = (
            PrivateRounds(
                dp,
                self.config.secure_aggregation,
                self.config.rounds,
                party.state_dir / PRIVACY_LEDGER if self.config.recovery else None,
            )
            if isinstance(dp, DifferentialPrivacy) and self.ranks.is_zero
            else None
        )
        self._role = (
            AggregatorRole(
                self.channel,
                self.config,
                algorithm=algorithm,
                early=outcome.early_evaluations,
                privacy=self.privacy,
            )
            if self.ranks.is_zero
            else None
        )
        self.history: list[dict[str, Any]] = []
        self.resumed_after = 0
        self._validated: dict[str, float] | None = None
        self._restored_algorithm: dict[str, Any] | None = None
        self._restored_privacy: dict[str, Any] | None = None
        self.initial_federated: dict[str, float] = {}

    @property
    def role(self) -> AggregatorRole:
        """Rank 0's role: the channel, the clients, the rounds."""
        if self._role is None:
            raise FedAvgError(f"rank {self.ranks.rank} has no channel; only rank 0 talks")
        return self._role

    @property
    @override
    def state_key(self) -> str:
        return "FedAvgAggregator"

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._role is None:  # only rank 0's checkpoint is written
            return {"task_id": self.party.task_id, "history": list(self.history)}
        state = {
            "task_id": self.party.task_id,
            "clients": dict(self.role.clients),
            "history": list(self.history),
            "algorithm": {**self.algorithm.describe(), "state": self.algorithm.state_dict()},
        }
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("task_id") != self.party.task_id:
            raise FedAvgError(
                f"the recovery checkpoint belongs to task {state_dict.get('task_id')!r}, not "
                f"{self.party.task_id!r}; hint: give each task its own state_dir"
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
        if self._role is not None:
            self._role.clients = dict(state_dict.get("clients", {}))
        self.history = list(state_dict.get("history", []))
        self.resumed_after = len(self.history)
        self._restored_algorithm = dict(saved.get("state", {}))
        privacy = state_dict.get("privacy")
        if (privacy is None) != (self.privacy is None) and self._role is not None:
            raise FedAvgError(
                "the recovery checkpoint was made "
                + ("with" if privacy is not None else "without")
                + " differential privacy and this run is "
                + ("with" if self.privacy is not None else "without")
                + " it; hint: restart with the same settings, or give the new run its own "
                "state_dir (the privacy already spent cannot be forgotten)"
            )
        self._restored_privacy = privacy

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
        self.ranks.from_zero(self._start)
        stop = self.ranks.from_zero(self._privacy_stop)
        if stop is not None:  # a restarted run that had spent its budget: no more rounds
            trainer.should_stop = True
            if self.ranks.is_zero:
                log.warning("aggregator: no more rounds: %s", stop)

    def _privacy_stop(self) -> str | None:
        """Rank 0: why no round may run now (the target epsilon), or None.

        Raises:
            FedAvgError: not even the first round fits the target.
        """
        if self.privacy is None:
            return None
        population = len(self.role.clients)
        per_round = participants_per_round(self.config.clients_per_round, population)
        stop = self.privacy.stop_reason(per_round, population)
        if stop is not None and not self.history:
            raise FedAvgError(
                f"differential privacy: the first round already exceeds the budget: {stop}; "
                "hint: raise noise_multiplier or target_epsilon, or give only target_epsilon "
                "to let it pick the noise"
            )
        return stop

    def _start(self) -> None:
        """Rank 0: set the algorithm up, then gather the clients (or find them again)."""
        self.algorithm.setup(self.model, self.role.expected_clients)
        if self._restored_algorithm is not None:
            self.algorithm.load_state_dict(self._restored_algorithm)
            self._restored_algorithm = None
        if self.privacy is not None:
            expected = self.role.expected_clients
            per_round = participants_per_round(self.config.clients_per_round, expected)
            self.privacy.setup(
                self.algorithm, self.model, expected, per_round, self.config.min_clients
            )
            if self._restored_privacy is not None:
                self.privacy.load_state_dict(self._restored_privacy)
                self._restored_privacy = None
        log.info("aggregator: algorithm %r", self.algorithm)
        if self.resumed_after and self.role.clients:
            self.role.poll_checkins()
            log.info("aggregator: clients %s carry on", ", ".join(sorted(self.role.clients)))
        else:
            self.role.gather()

    def run_round(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """One round: distribute, collect, fold, make the new global model, log.

        Rank 0 does the round; every rank loads the new global model.
        """
        round = trainer.current_epoch + 1
        done: list[tuple[RoundResult, dict[str, torch.Tensor]]] = []  # rank 0's

        def central() -> dict[str, Any]:  # rank 0
            current = federated_state(module, self.names)
            result = self.role.run_round(round, current, self.expected)
            new = self.algorithm.server_update(current, result.aggregate)
            problems = update_problems(self.expected, new)
            if problems:
                raise FedAvgError(
                    f"round {round}: algorithm {self.algorithm!r} made a global model that "
                    f"does not fit: {'; '.join(problems[:5])}; hint: lower its learning rate"
                )
            done.append((result, new))
            summary = result.summary()
            if self.privacy is not None and round < self.config.rounds:
                population = len(self.role.clients)
                next_round = participants_per_round(self.config.clients_per_round, population)
                stop = self.privacy.stop_reason(next_round, population)
                if stop is not None:
                    summary["stopped"] = stop
            return summary

        summary = self.ranks.from_zero(central)
        new = self.ranks.tensors(done[0][1] if done else None)
        copy_state(module, new)
        del new
        self.history.append(summary)
        if summary.get("stopped"):  # every rank stops with rank 0
            trainer.should_stop = True
            if self.ranks.is_zero:
                log.warning("aggregator: stopping after round %d: %s", round, summary["stopped"])
        if not done:
            return  # the other ranks: rank 0 logs the round
        result = done.pop()[0]
        if result.evaluations:  # the clients' validation of the model this round started from
            self._record_federated(trainer, module, round - 1, result.evaluations)
        flat: dict[str, float] = {
            "fedavg/participants": float(len(result.samples)),
            "fedavg/samples": float(result.aggregate.samples),
            "fedavg/round_seconds": result.seconds,
        }
        for client, n in result.samples.items():
            if n:  # 0: masked by secure aggregation
                flat[f"clients/{client}/num_samples"] = float(n)
            for name, value in result.metrics.get(client, {}).items():
                flat[f"clients/{client}/{name}"] = value
        if result.privacy is not None:
            flat.update(result.privacy.metrics())
            log.info(
                "aggregator: round %d: differential privacy spent epsilon=%.4g (delta=%g) so "
                "far; noise multiplier %.4g, clip %.4g",
                round,
                result.privacy.epsilon,
                self.config.differential_privacy.delta,  # type: ignore[union-attr]
                result.privacy.noise_multiplier,
                result.privacy.clip,
            )
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
        if self.config.recovery:  # every rank takes part; rank 0 writes
            path = self.recovery_path(trainer)
            tmp = temporary_sibling(path)
            trainer.save_checkpoint(tmp)
            if self.ranks.is_zero:
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
            "task_id": self.party.task_id,
            "aggregator": self.node_id,
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
            "privacy": None if self.privacy is None else self.privacy.describe(),
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
        trainer.save_checkpoint(out / "final.ckpt")  # every rank takes part; rank 0 writes
        evaluations: dict[str, Evaluation] = {}  # rank 0's
        final_round = len(self.history) if self.config.evaluate_on_clients else None

        def finish() -> tuple[dict[str, Any], dict[str, str]]:  # rank 0
            save_weights(pl_module.state_dict(), out / "final.safetensors")
            report = self.report(trainer, pl_module)
            save_report(report, out / "report.json")
            compact = {k: v for k, v in report.items() if k != "rounds"}
            self.role.finish(federated_state(pl_module, self.names), compact, final_round)
            if final_round is not None:
                evaluations.update(self.role.collect_evaluations(final_round))
            return report, dict(self.role.clients)

        report, clients = self.ranks.from_zero(finish)
        if final_round is not None:  # the report again, with the clients' final validation
            if self.ranks.is_zero:
                self._record_federated(trainer, pl_module, final_round, evaluations)
            report = self.ranks.from_zero(lambda: self.report(trainer, pl_module))
            if self.ranks.is_zero:
                save_report(report, out / "report.json")
        self.outcome.final_report = report
        self.outcome.test_report_due = clients
        log.info("aggregator: final model and report in %s", out)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._role is None:
            return  # this rank's reason reaches rank 0 (FedAvgStrategy.on_exception)
        reason = f"{type(exception).__name__}: {exception}"
        if self.ranks.world_size > 1:  # another rank's own reason is the one to send
            wait = PEER_REASON_WAIT if broke_collective(exception) else 0.0
            reason = peer_reason(self.party.state_dir, self.ranks.world_size, wait) or reason
        try:
            self._role.abort(reason)
        except Exception as exc:  # never hide the original failure
            log.warning("aggregator: could not tell the clients about the failure: %s", exc)
