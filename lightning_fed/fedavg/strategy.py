"""``FedAvgStrategy``: federate an unchanged LightningModule with one Trainer argument.

Clients train their local data for ``local_epochs`` per round between instructions
from the aggregator. The aggregator runs one Lightning epoch per round: its "training
step" sends the global weights, waits for the clients' updates and averages them;
then Lightning validates the new global model, so val metrics, checkpoints, early
stopping and loggers work as usual, with the round as the step.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_fed.algorithms import Algorithm, FedAvg, Statistic
from lightning_fed.channel import Channel, ChannelError
from lightning_fed.errors import SettingError
from lightning_fed.fedavg import protocol as P
from lightning_fed.fedavg.aggregator import AggregatorRole
from lightning_fed.fedavg.aggregator_hooks import AggregatorHooks
from lightning_fed.fedavg.client import ClientRole
from lightning_fed.fedavg.client_hooks import ClientHooks
from lightning_fed.fedavg.config import FedAvgConfig, resolve_role
from lightning_fed.fedavg.errors import FedAvgError, FederationAbortedError, SupersededError
from lightning_fed.fedavg.evaluation import Capture, Evaluation, merge
from lightning_fed.fedavg.hooks import Outcome, Party
from lightning_fed.fedavg.progress import RoundProgressBar
from lightning_fed.node import NodeBusyError, PartyStrategy
from lightning_fed.outputs import save_report, scalar_metrics
from lightning_fed.privacy.dp_settings import DifferentialPrivacy, LocalDP
from lightning_fed.privacy.settings import SecureAggregation
from lightning_fed.ranks import (
    PEER_REASON_WAIT,
    Ranks,
    broke_collective,
    clear_reasons,
    leave_reason,
    peer_reason,
    quiet_unless_zero,
)
from lightning_fed.trainer_access import callbacks_of
from lightning_fed.validation import positive_int

log = logging.getLogger(__name__)


class _RoundTicks:
    """The aggregator's stand-in for training data: one item per epoch (= one round)."""

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield torch.zeros(1)

    def __len__(self) -> int:
        return 1


class FedAvgStrategy(PartyStrategy):
    """Federated averaging (McMahan et al., 2017) as a Lightning strategy, for both roles.

    Every party runs the same LightningModule::

        # each data owner
        trainer = L.Trainer(strategy=FedAvgStrategy(url, task_id="t", node_id="a", role="client"))
        trainer.fit(model, datamodule=local_data)
        # the aggregator: validation/test data only
        trainer = L.Trainer(strategy=FedAvgStrategy(url, task_id="t", node_id="agg",
                                                    role="aggregator", rounds=5))
        trainer.fit(model, datamodule=holdout)
        trainer.test(model, datamodule=holdout)
        # a client that trains on two devices (DDP; here two CPU processes over gloo)
        trainer = L.Trainer(devices=2, accelerator="cpu", strategy=FedAvgStrategy(
            url, task_id="t", node_id="b", role="client", strategy="ddp"))

    ``FedAvgStrategy(...)`` becomes the subclass for ``strategy``
    (:class:`~lightning_fed.fedavg.engines.FedAvgSingleDevice` or
    :class:`~lightning_fed.fedavg.engines.FedAvgDDP`), which Lightning treats as its own
    single-device or DDP strategy.

    Args:
        channel: the shared storage URL (local folder, ``file://``, ``s3://``, ...) or a
            :class:`~lightning_fed.channel.Channel` (then ``task_id``, ``node_id`` and
            the key arguments come from it).
        task_id: the federation's id (the same on every party).
        node_id: this party's id, a node of the task configuration.
        role: ``"client"`` (trains local data) or ``"aggregator"`` (owns the schedule).
        is_initiator: the seed's name for the role: True is the aggregator.
        keys: folder holding ``task.json`` and ``<node_id>.key``, as written by
            ``lightning-fed keys federation``.
        task_config: path of ``task.json`` when it is not in ``keys``.
        key_file: path of this node's private key when it is not in ``keys``.
        storage_options: fsspec options for the URL (credentials, ``endpoint_url``...).
        clients: aggregator: how many clients to wait for before round 1 (default: every
            other node of the task).
        rounds: aggregator: number of rounds (the aggregator's ``max_epochs`` is set to it).
        local_epochs: aggregator: epochs each client trains per round (default 1).
        local_steps: aggregator: optimizer steps each client trains per round instead
            of epochs (Lightning's ``global_step`` units, so gradient accumulation
            counts once per step); a client's data loader carries on across rounds and
            starts a new epoch whenever it runs out. Exclusive with ``local_epochs``.
        clients_per_round: aggregator: clients sampled per round, a count or a fraction
            in (0, 1]; None takes every checked-in client. Sampling is seeded by ``seed``.
        min_clients: aggregator: fewer usable updates than this fail the round.
        calculation_timeout: seconds the aggregator waits for a round's updates.
        schedule_timeout: seconds to wait for check-ins and between instructions.
        log_rounds: aggregator: validate the global model every this many rounds.
        recovery: aggregator: checkpoint every completed round and, when restarted,
            resume after the last one.
        local_keys: glob patterns of state-dict names that stay local (never sent nor
            averaged), e.g. :data:`~lightning_fed.fedavg.BATCHNORM_STATS`.
        seed: seeds the per-round client sampling.
        aggregator: client: the aggregator's node id, if known (else discovered).
        state_dir: where recovery checkpoints and the replay journal live (default:
            ``<default_root_dir>/fedavg/<task_id>/<node_id>/state``).
        output_dir: where final weights and the report go (default:
            ``<default_root_dir>/fedavg/<task_id>/<node_id>``).
        max_model_bytes: the largest weights blob accepted from a peer.
        algorithm: aggregator: the federated algorithm, from
            :mod:`lightning_fed.algorithms` (default :class:`~lightning_fed.algorithms.FedAvg`,
            plain federated averaging). Clients learn it from each round's message, so
            it is never set on a client.
        evaluate_on_clients: aggregator: clients validate each round's global model on
            their own validation data before training on it, and every client
            validates the final model after the last round; the aggregator logs
            ``federated/<name>`` with the validated round as the step. Logged
            torchmetrics ``Metric`` objects are merged exactly; plain floats are
            averaged by validation samples (see docs/algorithms.md).
        optimizer_state: aggregator: what clients do with their optimizers' state
            (momentum buffers, Adam moments, step counts) when a round starts:
            ``"keep"`` carries it on from their previous round, as Lightning does from
            one epoch to the next (the default); ``"reset"`` clears it, so that every
            round starts as a fresh optimizer on the global model. Learning-rate
            schedulers keep stepping across rounds either way.
        secure_aggregation: aggregator: a
            :class:`~lightning_fed.privacy.SecureAggregation` to mask every update so
            that the aggregator learns only their sum (SecAgg+, see docs/privacy.md);
            clients learn it from each round. On a client: that client's requirement
            (it refuses rounds that are not secure, or less so).
        differential_privacy: aggregator: a
            :class:`~lightning_fed.privacy.DifferentialPrivacy` for client-level DP of
            the global model (DP-FedAvg: clipped updates, Gaussian noise on their sum,
            epsilon counted every round; central, or distributed among the clients with
            ``secure_aggregation``). Client: a :class:`~lightning_fed.privacy.LocalDP`
            for DP-SGD on that client's own data through Opacus. See docs/privacy.md.
        strategy: how this party trains inside: None (one device, the default) or
            ``"ddp"`` (one process per device of ``Trainer(devices=N)``; only global
            rank 0 talks to the other parties, see docs/scaling.md). Clients only.
        strategy_options: keyword arguments of Lightning's strategy for ``strategy``
            (e.g. ``{"find_unused_parameters": True}`` for DDP).
    """

    strategy_name = "fedavg"
    family = "fedavg"

    @classmethod
    def _engine_kwargs(
        cls, options: Mapping[str, Any], config: FedAvgConfig
    ) -> dict[str, Any]:  # pragma: no cover - every engine overrides it
        """The keyword arguments of the Lightning strategy this engine extends."""
        raise NotImplementedError

    def __init__(
        self,
        channel: str | Channel,
        task_id: str | None = None,
        node_id: str | None = None,
        role: str | None = None,
        *,
        is_initiator: bool | None = None,
        keys: str | os.PathLike[str] = "keys",
        task_config: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        clients: int | None = None,
        rounds: int = 10,
        local_epochs: int | None = None,
        local_steps: int | None = None,
        clients_per_round: int | float | None = None,
        min_clients: int = 1,
        calculation_timeout: float = 300.0,
        schedule_timeout: float = 60.0,
        log_rounds: int = 1,
        recovery: bool = False,
        local_keys: Sequence[str] = (),
        seed: int = 0,
        aggregator: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        max_model_bytes: int = 32 << 30,
        algorithm: Algorithm | None = None,
        evaluate_on_clients: bool = False,
        optimizer_state: str = "keep",
        secure_aggregation: SecureAggregation | None = None,
        differential_privacy: DifferentialPrivacy | LocalDP | None = None,
        strategy: str | None = None,
        strategy_options: Mapping[str, Any] | None = None,
    ) -> None:
        config = FedAvgConfig(
            role=resolve_role(role, is_initiator),
            clients=clients,
            rounds=rounds,
            local_epochs=local_epochs,
            local_steps=local_steps,
            clients_per_round=clients_per_round,
            min_clients=min_clients,
            calculation_timeout=calculation_timeout,
            schedule_timeout=schedule_timeout,
            log_rounds=log_rounds,
            recovery=recovery,
            local_keys=local_keys,
            seed=seed,
            aggregator=aggregator,
            evaluate_on_clients=evaluate_on_clients,
            optimizer_state=optimizer_state,
            secure_aggregation=secure_aggregation,
            differential_privacy=differential_privacy,
        )
        if type(self) is FedAvgStrategy:  # become the engine for ``strategy``
            from lightning_fed.fedavg.engines import engine_class

            self.__class__ = engine_class(strategy)
        super().__init__(**self._engine_kwargs(dict(strategy_options or {}), config))
        self.config = config
        self._init_party(
            channel,
            task_id,
            node_id,
            keys=keys,
            task_config=task_config,
            key_file=key_file,
            storage_options=storage_options,
            state_dir=state_dir,
            output_dir=output_dir,
        )
        self.max_model_bytes = positive_int("max_model_bytes", max_model_bytes)
        self.algorithm = self._check_algorithm(algorithm)
        if secure_aggregation is not None and type(self.algorithm.statistic()) is not Statistic:
            raise SettingError(
                f"secure_aggregation cannot run {self.algorithm!r}: it needs every client's "
                "update, and secure aggregation shows the aggregator only their sum; hint: use "
                "a mean-based algorithm (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, "
                "FedProx, Scaffold), or drop secure_aggregation"
            )
        if (
            isinstance(differential_privacy, DifferentialPrivacy)
            and type(self.algorithm.statistic()) is not Statistic
        ):
            raise SettingError(
                f"differential_privacy cannot run {self.algorithm!r}: DP-FedAvg bounds each "
                "client's influence on a mean by clipping it, and a robust statistic is not a "
                "mean; hint: use FedAvg, FedAvgM, FedProx or a server optimiser (FedAdam, "
                "FedYogi, FedAdagrad)"
            )
        self._outcome = Outcome()  # what the hooks leave: the report, who finished
        self._test_capture: Capture | None = None  # client: its test of the final model
        self._hooks: AggregatorHooks | ClientHooks | None = None
        self._trainer: pl.Trainer | None = None
        self._ranks: Ranks | None = None
        self._state_dir: Path | None = None
        self._failure_reported = False

    def _check_algorithm(self, algorithm: Algorithm | None) -> Algorithm:
        if algorithm is not None and not isinstance(algorithm, Algorithm):
            raise SettingError(
                f"algorithm must be a lightning_fed.algorithms.Algorithm such as FedProx(mu=0.01), "
                f"got {algorithm!r}"
            )
        if algorithm is not None and self.role == "client":
            raise SettingError(
                f"algorithm={algorithm!r} is set on client {self.node_id!r}, but the aggregator "
                "chooses the algorithm and clients learn it from each round; hint: set it on "
                "the aggregator only"
            )
        if algorithm is not None:
            algorithm.describe()  # its parameters must travel as JSON
        return algorithm if algorithm is not None else FedAvg()

    @property
    def final_report(self) -> dict[str, Any] | None:
        """The federation's report once ``fit`` ended.

        On the aggregator, the whole report (with ``test_metrics`` after ``test``); on a
        client, the summary that came with the finish (with ``test_metrics`` after
        :meth:`receive_test_report`).
        """
        return self._outcome.final_report

    @property
    def left(self) -> str | None:
        """Client: why it left the federation before the finish (its Trainer stopped,
        e.g. by ``EarlyStopping``), or None."""
        return self._outcome.left

    # -- where things are ------------------------------------------------------------
    @property
    def role(self) -> str:
        """``"client"`` or ``"aggregator"``."""
        return self.config.role

    # -- Lightning hooks ----------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.TESTING and self._federated_test_due():
            self._test_capture = Capture(self._final_round())  # sent at on_test_end
            callbacks_of(trainer).append(self._test_capture)
        if trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test/predict run locally on the model as it is
        ranks = self._ranks = Ranks(self)
        quiet_unless_zero(ranks.rank)
        self._state_dir = self.state_dir(trainer)
        ranks.from_zero(lambda: self._connect(trainer, ranks.world_size))
        channel = self._channel  # rank 0's; None on the other ranks
        module = self.lightning_module
        assert module is not None
        party = Party(
            self.config,
            self.task_id,
            self.node_id,
            channel,
            self.output_dir(trainer),
            self.state_dir(trainer),
        )
        hooks: AggregatorHooks | ClientHooks
        if self.role == "aggregator":
            hooks = AggregatorHooks(party, self._outcome, self.algorithm, ranks)
            self._setup_aggregator_loop(trainer)
        else:
            hooks = ClientHooks(party, self._outcome, ranks)
            trainer.fit_loop.max_epochs = -1  # the aggregator's schedule decides
            trainer.fit_loop.min_epochs = 0
        self._hooks = hooks
        self._trainer = trainer
        if isinstance(hooks, ClientHooks) and hooks.local_dp is not None:
            callbacks_of(trainer).append(hooks.local_dp)
        callbacks_of(trainer).append(hooks)
        if self.role == "aggregator" and self.config.recovery:
            assert isinstance(hooks, AggregatorHooks)
            hooks.restore_if_possible(trainer)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """A LocalDP client trains on its dataloader's Poisson-sampled form (see
        :meth:`~lightning_fed.privacy.dpsgd.DPSGDCallback.sampling_loader`)."""
        dataloader = super().process_dataloader(dataloader)
        hooks, trainer = self._hooks, self._trainer
        if (
            isinstance(hooks, ClientHooks)
            and hooks.local_dp is not None
            and trainer is not None
            and trainer.state.stage == RunningStage.TRAINING
        ):
            return hooks.local_dp.sampling_loader(dataloader)
        return dataloader

    def _setup_aggregator_loop(self, trainer: pl.Trainer) -> None:
        # One epoch per round, fed by a one-item stand-in: the aggregator holds no
        # training data, and its datamodule needs no train_dataloader.
        trainer.fit_loop._data_source.instance = _RoundTicks()
        trainer.fit_loop.max_epochs = self.config.rounds
        trainer.fit_loop.min_epochs = 0
        trainer.check_val_every_n_epoch = self.config.log_rounds
        trainer.log_every_n_steps = 1  # type: ignore[attr-defined]
        # Lightning's default bar counts batches per epoch; show one bar over the rounds.
        for i, cb in enumerate(callbacks_of(trainer)):
            if type(cb) is TQDMProgressBar:
                bar = RoundProgressBar(self.config.rounds, refresh_rate=cb.refresh_rate, leave=True)
                bar.setup(trainer, self.lightning_module, "fit")  # type: ignore[arg-type]  # callbacks' setup already ran
                callbacks_of(trainer)[i] = bar

    def _connect(self, trainer: pl.Trainer, world_size: int) -> None:
        """Rank 0: open the channel and claim the node."""
        self._claim_node(self._open_channel(trainer))
        clear_reasons(self.state_dir(trainer), world_size)

    def _open_channel(self, trainer: pl.Trainer) -> Channel:
        return self._connect_channel(
            max_blob_bytes=self.max_model_bytes, state_dir=self.state_dir(trainer)
        )

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self._hooks, AggregatorHooks):
            assert self._trainer is not None and self.lightning_module is not None
            self._hooks.run_round(self._trainer, self.lightning_module)
            # A constant "loss" keeps Lightning's loop happy; optimizer_step never steps it.
            return torch.zeros((), device=self.root_device, requires_grad=True)
        return super().training_step(*args, **kwargs)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        if isinstance(self._hooks, AggregatorHooks):
            return closure()  # runs the round; the aggregate replaces the weights
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    @override
    def on_test_end(self) -> None:
        super().on_test_end()
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None:
            return
        if self.role == "client":
            capture, self._test_capture = self._test_capture, None
            if capture is not None:
                callbacks_of(trainer).remove(capture)
                evaluation = capture.evaluation(trainer.callback_metrics)
                self._send_test(trainer, evaluation or Evaluation(capture.round, 0, {}))
            return
        clients, report = self._outcome.test_report_due, self.final_report
        if clients is None or report is None:
            return  # not the test right after this process's federation
        report["test_metrics"] = scalar_metrics(trainer.callback_metrics)
        if Ranks(self).is_zero:
            save_report(report, self.output_dir(trainer) / "report.json")
        if self.config.evaluate_on_clients:
            return  # collect_client_tests() publishes, with the clients' tests merged
        self._outcome.test_report_due = None
        self._publish(trainer, report, clients)

    def _publish(
        self, trainer: pl.Trainer, report: dict[str, Any], clients: dict[str, str]
    ) -> None:
        """Rank 0: send the report with the final test's metrics to the clients that finished."""
        if not Ranks(self).is_zero:
            return
        compact = {k: v for k, v in report.items() if k != "rounds"}
        try:
            channel = self._open_channel(trainer)
            AggregatorRole(channel, self.config, clients).publish_report(compact)
        except Exception as exc:  # the test itself succeeded; say so, do not fail it
            log.warning("aggregator: could not send the test metrics to the clients: %s", exc)
        else:
            log.info("aggregator: test metrics sent to the clients")

    @override
    def on_exception(self, exception: BaseException) -> None:
        """A party that fails tells the others at once, with the reason.

        A client sends the aggregator ``failed``; an aggregator aborts its clients (its
        hooks do, once the rounds began) and refuses the check-ins waiting for it. In a
        party of several processes a rank other than 0 leaves its reason for rank 0,
        which sends it (see :mod:`lightning_fed.ranks`).
        """
        super().on_exception(exception)
        reason = f"{type(exception).__name__}: {exception}".strip()
        state_dir = self._current_state_dir()
        if Ranks(self).rank != 0:
            if state_dir is not None:
                leave_reason(state_dir, Ranks(self).rank, reason)
            return
        if self.role == "aggregator":
            self._refuse_waiting_clients(exception)
            return
        if isinstance(exception, FederationAbortedError | SupersededError | NodeBusyError):
            return  # the aggregator knows already, or another process serves this node
        if Ranks(self).world_size > 1 and state_dir is not None:
            wait = PEER_REASON_WAIT if broke_collective(exception) else 0.0
            reason = peer_reason(state_dir, Ranks(self).world_size, wait) or reason
        self.report_client_failure(reason, channel_failed=isinstance(exception, ChannelError))

    def report_client_failure(self, reason: str, channel_failed: bool = False) -> None:
        """Client, global rank 0: tell the aggregator that this client stopped, once.

        Never raises: a failure to tell must not hide the failure itself.
        """
        if self._failure_reported:
            return
        self._failure_reported = True
        try:
            hooks, channel = self._hooks, self._channel
            if isinstance(hooks, ClientHooks) and hooks.role.aggregator is not None:
                with self.endpoint.make_channel(max_blob_bytes=self.max_model_bytes) as fresh:
                    role = ClientRole(fresh, self.config)  # the failing process's instance
                    role.aggregator, role.instance = hooks.role.aggregator, hooks.role.instance
                    role.report_failure(reason)
            elif channel is not None:
                ClientRole(channel, self.config).report_failure(reason)
            elif channel_failed:
                return  # the storage or the keys failed: there is no way to tell anyone
            else:  # failed before the channel opened (its data, its model's setup)
                with self.endpoint.make_channel(max_blob_bytes=self.max_model_bytes) as early:
                    ClientRole(early, self.config).report_failure(reason)
        except Exception as exc:  # never hide the original failure
            log.warning("client %s: could not tell the aggregator: %s", self.node_id, exc)
        else:
            log.info("client %s: told the aggregator that this client stopped", self.node_id)

    def abort_clients(self, reason: str) -> None:
        """Aggregator, global rank 0: tell every client that the federation failed, once.

        Uses a channel of its own (the caller may be a thread watching the ranks while
        the training thread holds the party's). Never raises.
        """
        if self._failure_reported:
            return
        self._failure_reported = True
        hooks = self._hooks
        clients = dict(hooks.role.clients) if isinstance(hooks, AggregatorHooks) else {}
        try:
            with self.endpoint.make_channel(max_blob_bytes=self.max_model_bytes) as fresh:
                AggregatorRole(fresh, self.config, clients).abort(
                    f"the aggregator stopped: {reason}"
                )
        except Exception as exc:  # never hide the original failure
            log.warning("aggregator: could not tell the clients about the failure: %s", exc)
        else:
            log.info("aggregator: told the clients that the federation stopped")

    def _current_state_dir(self) -> Path | None:
        if self._state_dir is not None:
            return self._state_dir
        module = self.lightning_module
        trainer = None if module is None else module._trainer
        return None if trainer is None else self.state_dir(trainer)

    def _refuse_waiting_clients(self, exception: BaseException) -> None:
        """An aggregator that failed before its rounds began answers the waiting check-ins."""
        if self._hooks is not None or isinstance(exception, ChannelError | NodeBusyError):
            return  # its hooks abort the clients; or no storage, or not this node's turn
        reason = f"the aggregator stopped: {type(exception).__name__}: {exception}"
        try:
            with self.endpoint.make_channel(max_blob_bytes=self.max_model_bytes) as channel:
                AggregatorRole(channel, self.config).abort(reason)
        except Exception as exc:  # never hide the original failure
            log.warning("aggregator: could not tell the clients about the failure: %s", exc)

    # -- the final test, federated (evaluate_on_clients) ---------------------------------
    def _federated_test_due(self) -> bool:
        """Client: whether the aggregator waits for this client's test of the final model."""
        report = self.final_report
        return (
            self.role == "client"
            and self._outcome.finished_as is not None
            and report is not None
            and bool(report.get("federated_test_expected"))
            and not self._outcome.test_sent
        )

    def _final_round(self) -> int:
        report = self.final_report or {}
        rounds = report.get("rounds_completed", 0)
        return rounds if isinstance(rounds, int) else 0

    def _send_test(self, trainer: pl.Trainer, evaluation: Evaluation) -> None:
        finished = self._outcome.finished_as
        assert finished is not None

        def send() -> None:  # rank 0
            body, states = evaluation.encode()
            channel = self._open_channel(trainer)
            try:
                role = ClientRole(channel, self.config)
                role.aggregator, role.instance = finished
                role.send_evaluation(body, states, "test")
            finally:
                channel.close()
                self._channel = None

        Ranks(self).from_zero(send)
        self._outcome.test_sent = True
        log.info(
            "client %s: sent its test of the final model (%d samples) to the aggregator",
            self.node_id,
            evaluation.samples,
        )

    def decline_test(self) -> None:
        """Client without test data, after ``fit``: tell an aggregator that waits for the
        clients' tests (``evaluate_on_clients``) not to wait for this one.

        ``trainer.test(...)`` on a client sends its test instead; neither is needed when
        the aggregator does not evaluate on clients.
        """
        if self._federated_test_due():
            self._send_test(self._trainer_after_fit(), Evaluation(self._final_round(), 0, {}))

    def collect_client_tests(self, timeout: float | None = None) -> dict[str, float] | None:
        """Aggregator, after ``fit`` (and its own ``test``, if it has test data): the
        clients' tests of the final model, merged, then the report sent to the clients.

        With ``evaluate_on_clients`` every client that finished runs ``trainer.test``
        on its own data (or :meth:`decline_test`); logged torchmetrics ``Metric``
        objects merge exactly, floats by test samples (see docs/algorithms.md). The
        result is ``federated_test_metrics`` in ``report.json`` and in the report the
        clients receive.

        Args:
            timeout: seconds to wait for the clients (default ``calculation_timeout``).

        Returns:
            The merged metrics, or None when the aggregator does not evaluate on clients.
        """
        if self.role != "aggregator" or not self.config.evaluate_on_clients:
            return None
        trainer = self._trainer_after_fit()
        report, clients = self.final_report, self._outcome.test_report_due
        if report is None or clients is None:
            raise FedAvgError(
                "collect_client_tests() is for an aggregator whose fit completed, once; "
                "hint: call it after trainer.fit(...) (and trainer.test(...), if any)"
            )
        self._outcome.test_report_due = None
        rounds = self._final_round()
        ranks = Ranks(self)

        def collect() -> dict[str, Evaluation]:  # rank 0
            channel = self._open_channel(trainer)
            try:
                role = AggregatorRole(
                    channel, self.config, clients, early=self._outcome.early_evaluations
                )
                return role.collect_evaluations(rounds, "test", timeout)
            finally:
                channel.close()
                self._channel = None

        evaluations = ranks.from_zero(collect)
        module = self.lightning_module
        assert module is not None
        merged, exact = merge(module, evaluations.items())
        report.setdefault("test_metrics", {})
        report["federated_test_metrics"] = merged
        report["federated_test_exact"] = exact
        report["federated_test_clients"] = sorted(e for e, v in evaluations.items() if v.samples)
        if ranks.is_zero:
            save_report(report, self.output_dir(trainer) / "report.json")
        for logger in trainer.loggers:
            logger.log_metrics({f"federated/{k}": v for k, v in merged.items()}, step=rounds)
        log.info(
            "aggregator: federated test of the final model by %d clients: %s",
            len(report["federated_test_clients"]),
            ", ".join(f"{k}={v:.4g}" for k, v in sorted(merged.items())) or "nothing logged",
        )
        self._publish(trainer, report, clients)
        return merged

    def receive_test_report(self, timeout: float | None = None) -> dict[str, Any] | None:
        """Client, after ``fit``: wait for the aggregator's final test metrics.

        The aggregator sends them when its ``trainer.test`` ends (``lightning_fed.party``
        always tests after a federation). They are added to this client's
        ``report.json`` as ``test_metrics``.

        Args:
            timeout: seconds to wait (default ``schedule_timeout``).

        Returns:
            The report with ``test_metrics``, or None when the aggregator's model has
            no ``test_step`` or no metrics came in time.

        Raises:
            FedAvgError: on the aggregator, or before this client's federation finished.
        """
        trainer = self._trainer_after_fit()
        finished, known = self._outcome.finished_as, self.final_report
        if self.role != "client" or finished is None or known is None:
            raise FedAvgError(
                "receive_test_report() is for a client whose fit ended with the federation's "
                "finish; hint: call it after trainer.fit(...) returned on a client"
            )
        if "test_metrics" in known:
            return known  # received already
        if not known.get("test_expected", False):
            return None
        wait = self.config.schedule_timeout if timeout is None else timeout

        def receive() -> P.Report | None:  # rank 0
            channel = self._open_channel(trainer)
            try:
                role = ClientRole(channel, self.config)
                role.aggregator, role.instance = finished
                return role.receive_report(wait)
            finally:
                channel.close()
                self._channel = None

        got = Ranks(self).from_zero(receive)
        if got is None:
            log.info("client %s: no test metrics from the aggregator in %g s", self.node_id, wait)
            return None
        report = {**known, **got.report, "test_metrics": got.test_metrics}
        if Ranks(self).rank == 0:
            save_report(report, self.output_dir(trainer) / "report.json")
        self._outcome.final_report = report
        return report

    def _trainer_after_fit(self) -> pl.Trainer:
        module = self.lightning_module
        trainer = None if module is None else module._trainer
        if trainer is None:
            raise FedAvgError("this strategy has not run a fit yet; hint: trainer.fit(...) first")
        return trainer

    @override
    def teardown(self) -> None:
        trainer, hooks = self._trainer, self._hooks
        if hooks is not None and trainer is not None:
            hooks.detach(trainer)
        self._hooks, self._trainer = None, None
        super().teardown()  # the party's claim and channel go (PartyStrategy)


# ``FedAvgStrategy(...)`` becomes an engine subclass (lightning_fed.fedavg.engines), whose
# Lightning strategy implements Strategy's abstract methods. Saying that the class itself
# is concrete lets LightningCLI (jsonargparse) accept ``class_path:
# lightning_fed.FedAvgStrategy``, which it refuses for abstract classes.
FedAvgStrategy.__abstractmethods__ = frozenset()
