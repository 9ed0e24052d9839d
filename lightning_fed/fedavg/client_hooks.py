"""A client's Lightning callback: local training between the aggregator's instructions."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

from lightning_fed.algorithms import (
    ClientAlgorithm,
    ClientRound,
    algorithm_from,
)
from lightning_fed.algorithms.base import AlgorithmError, split_extras, with_extras
from lightning_fed.fedavg import protocol as P
from lightning_fed.fedavg.client import ClientRole, Instruction
from lightning_fed.fedavg.client_link import ClientLink
from lightning_fed.fedavg.errors import FedAvgError, RoundAbandonedError
from lightning_fed.fedavg.evaluation import Evaluation, validate_now
from lightning_fed.fedavg.hooks import Outcome, Party, RoleHooks
from lightning_fed.fedavg.secure_client import SecureRoundClient, secure_round_of
from lightning_fed.fedavg.weights import federated_state, load_state
from lightning_fed.outputs import (
    save_report,
    save_weights,
    scalar_metrics,
    temporary_sibling,
)
from lightning_fed.privacy.buffers import zeros
from lightning_fed.privacy.dp import add_noise_, clip_, noise_generator
from lightning_fed.privacy.dp_settings import UNCLIPPED_EXTRA, DistributedNoise, LocalDP
from lightning_fed.privacy.dpsgd import DPSGDCallback
from lightning_fed.ranks import Ranks
from lightning_fed.trainer_access import callbacks_of

log = logging.getLogger(__name__)

#: The client's local DP-SGD accountant history, in its state folder.
LOCAL_DP_STATE = "local-dp-accountant.json"


def reset_optimizers(trainer: pl.Trainer) -> None:
    """Clear every optimizer's per-parameter state (momentum, moments, step counts); its
    hyperparameters and learning rate (a scheduler's business) stay."""
    for optimizer in trainer.optimizers:
        optimizer.state.clear()


class ClientHooks(RoleHooks, Checkpoint):
    """A client's side: check in, train each round's epochs or steps, upload, follow.

    It is a :class:`~lightning.pytorch.callbacks.Checkpoint` only so that Lightning
    calls its ``on_train_epoch_end`` last, after the module's own and after the
    monitoring callbacks (``EarlyStopping``, ``ModelCheckpoint``): the round ends with
    everything the epoch logged, checkpointed and decided (a stop included). It saves
    nothing and is removed when ``fit`` ends.

    In epochs mode the round ends at the end of its last local epoch, and
    ``num_samples`` is the number of samples of that epoch (the local dataset's size).
    In steps mode it ends after the batch that completes its optimizer steps, and
    ``num_samples`` counts every sample trained in the round.
    """

    def __init__(self, party: Party, outcome: Outcome, ranks: Ranks) -> None:
        super().__init__(party, outcome)
        self.ranks = ranks
        role = ClientRole(party.channel, self.config) if party.channel is not None else None
        self.role = ClientLink(role, ranks)
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
        self._secure: SecureRoundClient | None = None  # rank 0, during a secure round
        self._secure_global: dict[str, torch.Tensor] | None = None  # the round's start
        self._secure_noise: DistributedNoise | None = None  # distributed DP's clip and noise
        dp = self.config.differential_privacy
        #: local DP-SGD (Opacus) on this client's data, if it has LocalDP
        self.local_dp = (
            DPSGDCallback(dp, party.state_dir / LOCAL_DP_STATE, self.node_id)
            if isinstance(dp, LocalDP)
            else None
        )

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
            if start.optimizer_state == "reset":
                reset_optimizers(trainer)
            self._start_algorithm(trainer, pl_module, start, instruction.round, model, extras)
            self._start_secure(instruction, model)
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
        if self.ranks.is_zero:
            save_weights(pl_module.state_dict(), out / "final.safetensors")
            save_report(instruction.report, out / "report.json")
        self.outcome.final_report = dict(instruction.report)
        assert self.role.aggregator is not None
        self.outcome.finished_as = (self.role.aggregator, self.role.instance)
        log.info("client %s: federation finished; final model in %s", self.node_id, out)
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
                self.node_id,
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
        self.seen = self.ranks.total(self.seen)  # every rank trained its shard
        if self.seen < 1:
            raise FedAvgError(
                f"client {self.node_id!r} trained on no samples this round; hint: "
                "check its train_dataloader and limit_train_batches"
            )
        metrics = scalar_metrics(trainer.callback_metrics)
        metrics["fit_seconds"] = time.monotonic() - self.fit_started  # local training time
        extras = {} if self.algorithm is None else self.algorithm.finish_round(pl_module)
        if self.local_dp is not None:
            spent = self.local_dp.finish_round()
            metrics.update(spent)
            current = self.role.current
            if current is not None:
                for logger in trainer.loggers:
                    logger.log_metrics(spent, step=current.round)
            if self.local_dp.stopping_reason:
                trainer.should_stop = True
        evaluation, self._evaluation = self._evaluation, None
        body: dict[str, Any] | None = None
        states: dict[str, torch.Tensor] = {}
        if evaluation is not None:
            body, states = evaluation.encode()
        if self._secure_global is not None:
            self._upload_secure(pl_module, extras, metrics, body, states)
        else:
            tensors = with_extras(federated_state(pl_module, self.names), extras)
            tensors.update(states)
            self.role.upload(tensors, self.seen, metrics, body)
            del tensors
        del extras
        if self.algorithm is not None and self.ranks.is_zero:
            # After the upload, off the round's critical path: the aggregator folds the
            # update while this is written. A crash between the two leaves the state of
            # the previous round, as a crash just before the upload would.
            self._save_algorithm_state()
        current = self.role.current
        round = "?" if current is None else current.round
        log.info(
            "client %s: round %s trained on %d samples%s",
            self.node_id,
            round,
            self.seen,
            "".join(f", {k}={v:.4g}" for k, v in sorted(metrics.items())),
        )
        if self.ranks.from_zero(lambda: bool(trainer.should_stop)):
            self._leave(round, self._stopped_by(trainer))
            return
        self._follow(trainer, pl_module, self.role.next_instruction())

    def _stopped_by(self, trainer: pl.Trainer) -> str:
        """Which callback stopped the Trainer, as best Lightning tells."""
        if self.local_dp is not None and self.local_dp.stopping_reason:
            return self.local_dp.stopping_reason
        for callback in callbacks_of(trainer):
            message = getattr(callback, "stopping_reason_message", None)
            if isinstance(callback, EarlyStopping) and message:
                return f"EarlyStopping: {message}"
        return "should_stop, set by a callback or the Trainer"

    def _leave(self, round: object, why: str) -> None:
        """This client's Trainer stopped (EarlyStopping, max_time...): it leaves the
        federation after the round it just sent, and tells the aggregator at once."""
        reason = f"its Trainer stopped after round {round} ({why}); that round's update was sent"
        self.finished = True
        self.outcome.left = reason
        self.role.report_failure(reason, left=True)
        log.info("client %s: left the federation: %s", self.node_id, reason)

    # -- secure aggregation ---------------------------------------------------------------
    def _start_secure(self, instruction: Instruction, model: Mapping[str, torch.Tensor]) -> None:
        """A secure round: start its key exchange (rank 0, on a thread while the party
        trains)."""
        start = instruction.start
        assert start is not None
        self._secure, self._secure_global, self._secure_noise = None, None, None
        spec = secure_round_of(start, self.config.secure_aggregation, self.node_id)
        if spec is None:
            return
        if start.dp is not None:
            try:
                self._secure_noise = DistributedNoise.parse(start.dp)
            except ValueError as exc:
                raise FedAvgError(f"client {self.node_id!r}: {exc}") from None

        if self.ranks.is_zero:  # its key exchange runs while the party trains
            self._secure = SecureRoundClient(self.role.role, spec, instruction.round, start.attempt)
            self._secure.start()
        self._secure_global = dict(model)

    def _upload_secure(
        self,
        pl_module: pl.LightningModule,
        extras: Mapping[str, torch.Tensor],
        metrics: Mapping[str, float],
        body: dict[str, Any] | None,
        states: Mapping[str, torch.Tensor],
    ) -> None:
        """Rank 0 masks and sends this round's change, then helps unmask the sum."""
        start = self._secure_global
        assert start is not None
        self._secure_global = None
        seen = self.seen
        noise, self._secure_noise = self._secure_noise, None

        def upload(role: ClientRole) -> None:
            assert self._secure is not None
            state = federated_state(pl_module, self.names)
            # The change in the model's precision (at least float32): its rounding (about
            # 1e-7 of a weight) is far below a quantisation step, and float64 would double
            # the memory traffic of every pass over a large model.
            deltas = {n: _change(t, start[n]) for n, t in state.items()}
            del state
            weight = seen
            sent = extras
            if noise is not None:  # distributed DP: clip, add this client's share of noise
                generator = noise_generator()
                norm = clip_(deltas, noise.clip)
                add_noise_(deltas, noise.std, generator)
                weight = 1  # equal weights: a client's influence is bounded by the clip
                if noise.count_std:  # adaptive clipping: did it fit (centred), noised
                    fit = (0.5 if norm <= noise.clip else -0.5) + noise.count_std * float(
                        torch.randn((), generator=generator, dtype=torch.float64)
                    )
                    sent = {**extras, UNCLIPPED_EXTRA: torch.tensor([fit], dtype=torch.float32)}
            self._secure.upload(deltas, sent, weight, metrics, body, states)

        try:
            self.role.on_zero(upload)
        except RoundAbandonedError as exc:
            log.warning("client %s: %s", self.node_id, exc)
        finally:
            self._secure = None

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
            log.info("client %s: algorithm %r", self.node_id, algorithm)
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

        def load() -> dict[str, Any] | None:  # rank 0's file, for every rank
            if not path.is_file():
                return None
            state: dict[str, Any] = torch.load(path, weights_only=True)
            return state

        state = self.ranks.from_zero(load)
        if state is not None:
            client.load_state_dict(state)
            log.info("client %s: restored %s's state from %s", self.node_id, name, path)

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
        if self.local_dp is not None and self.local_dp in callbacks_of(trainer):
            callbacks_of(trainer).remove(self.local_dp)
        super().detach(trainer)


def _change(weights: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``weights - start`` in the weights' precision (at least float32), in a new
    buffer (on huge pages where it is large: see :mod:`lightning_fed.privacy.buffers`)."""
    dtype = torch.promote_types(weights.dtype, torch.float32)
    out = zeros(weights.numel(), dtype).view(weights.shape)
    return out.copy_(weights.detach()).sub_(start)
