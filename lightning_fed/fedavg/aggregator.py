"""The aggregator's side of the protocol: check-ins, rounds, streaming aggregation, finish.

No Lightning here: :class:`AggregatorRole` moves messages over a connected
:class:`~lightning_fed.channel.Channel` and folds updates into the algorithm's
:class:`~lightning_fed.algorithms.Statistic` one at a time, so with FedAvg's the
peak memory is the global model, one accumulator and the one update being read.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_fed.algorithms import Algorithm, ClientUpdate, FedAvg, RoundAggregate
from lightning_fed.algorithms.aggregate import TensorSpec, update_problems
from lightning_fed.algorithms.base import split_extras, with_extras
from lightning_fed.channel import BlobIntegrityError, Channel, ChannelTimeoutError, Message
from lightning_fed.fedavg import protocol as P
from lightning_fed.fedavg.config import FedAvgConfig
from lightning_fed.fedavg.dp_aggregator import PrivateRounds, RoundPrivacy
from lightning_fed.fedavg.errors import FedAvgError, RoundFailedError
from lightning_fed.fedavg.evaluation import Evaluation, split_evaluation
from lightning_fed.fedavg.selection import sample_clients
from lightning_fed.logs import WaitNotice
from lightning_fed.node.liveness import PeerWatch
from lightning_fed.privacy.vector import Layout

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one round produced: the algorithm's aggregate and who contributed."""

    round: int
    aggregate: RoundAggregate = field(repr=False)
    samples: dict[str, int]
    metrics: dict[str, dict[str, float]]
    rejected: dict[str, str]
    missing: list[str]
    seconds: float
    #: clients' validations of the round's incoming global model (evaluate_on_clients)
    evaluations: dict[str, Evaluation] = field(default_factory=dict, repr=False)
    #: what the round spent under differential privacy, if the run has it
    privacy: RoundPrivacy | None = None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record of the round for the metrics report."""
        out = {
            "round": self.round,
            "samples": dict(self.samples),
            "client_metrics": self.metrics,
            "rejected": dict(self.rejected),
            "missing": list(self.missing),
            "seconds": round(self.seconds, 4),
        }
        if self.privacy is not None:
            out["privacy"] = self.privacy.summary()
        return out


def _answers_this_round(msg: Message, round: int, attempt: str) -> bool:
    return msg.round == round and msg.body.get("attempt") == attempt


class AggregatorRole:
    """Runs the schedule: who takes part, what they receive, what is averaged.

    Args:
        channel: a connected channel of the aggregator node.
        config: the FedAvg settings.
        clients: node ids already checked in, with their process instance (recovery).
        algorithm: the federated algorithm (default: FedAvg).
    """

    def __init__(
        self,
        channel: Channel,
        config: FedAvgConfig,
        clients: Mapping[str, str] | None = None,
        algorithm: Algorithm | None = None,
        early: dict[str, list[Message]] | None = None,
        privacy: PrivateRounds | None = None,
    ) -> None:
        self.channel = channel
        self.config = config
        #: differential privacy across rounds (clip, noise, accountant), if the run has it
        self.privacy = privacy
        #: Evaluations that came before their phase was collected (phase -> messages):
        #: a fast client's test of the final model can arrive while the aggregator still
        #: collects the others' validation. Pass the same dict to the role that collects
        #: the test.
        self.early: dict[str, list[Message]] = {} if early is None else early
        self.algorithm = algorithm if algorithm is not None else FedAvg()
        self.clients: dict[str, str] = dict(clients or {})
        #: Clients that said they stopped with an error (node id -> their reason).
        self.failed: dict[str, str] = {}
        #: Those of them that left of their own accord (their Trainer stopped).
        self.left: set[str] = set()
        #: Tells which waited-for clients' processes are gone (their presence claims).
        self.watch = PeerWatch(channel)
        self.expected_clients = config.clients or len(channel.peers)
        if config.min_clients > len(channel.peers):
            raise FedAvgError(
                f"min_clients={config.min_clients} but task {channel.task.task_id!r} has only "
                f"{len(channel.peers)} client node(s) ({', '.join(channel.peers) or '-'}); "
                "hint: lower min_clients or add clients' keys to the task configuration"
            )

    # -- gathering -----------------------------------------------------------------
    def handle_checkin(self, msg: Message) -> None:
        """Register (or re-register) a client and acknowledge it once per process."""
        try:
            checkin = P.CheckIn.parse(msg.body, msg.sender)
        except P.ProtocolError as exc:
            log.warning("aggregator: ignored a malformed check-in: %s", exc)
            return
        known = self.clients.get(msg.sender)
        if known == checkin.instance:
            log.debug("aggregator: repeated check-in of %s ignored", msg.sender)
            return
        if known is not None:
            log.warning(
                "aggregator: client %s checked in again from a new process (instance %s "
                "replaces %s); the older process is superseded",
                msg.sender,
                checkin.instance,
                known,
            )
        else:
            log.info("aggregator: client %s checked in", msg.sender)
        self.clients[msg.sender] = checkin.instance
        self.failed.pop(msg.sender, None)
        ack = P.CheckInAck(checkin.instance, self.channel.node_id, self.config.rounds)
        self.channel.send(P.CHECKIN_ACK, P.body_of(ack), to=msg.sender)

    def handle_failed(self, msg: Message) -> str | None:
        """A client's report that it stopped: drop it from the federation at once.

        Returns:
            The client's reason, or None when the report is not about a current client
            process (malformed, or from a process that a newer one replaced).
        """
        try:
            failed = P.Failed.parse(msg.body, msg.sender)
        except P.ProtocolError as exc:
            log.warning("aggregator: ignored a malformed failure report: %s", exc)
            return None
        known = self.clients.get(msg.sender)
        if known is not None and known != failed.instance:
            log.info("aggregator: ignored the failure of a superseded process of %s", msg.sender)
            return None
        self.clients.pop(msg.sender, None)
        self.failed[msg.sender] = failed.reason
        if failed.left:
            self.left.add(msg.sender)
            log.info("aggregator: client %s left the federation: %s", msg.sender, failed.reason)
            return failed.reason
        log.warning(
            "aggregator: client %s stopped with an error and leaves the federation: %s",
            msg.sender,
            failed.reason,
        )
        return failed.reason

    def _handle(self, msg: Message) -> None:
        if msg.kind == P.CHECKIN:
            self.handle_checkin(msg)
        elif msg.kind == P.FAILED:
            self.handle_failed(msg)

    def poll_checkins(self) -> None:
        """Handle every check-in and failure report waiting now."""
        for msg in self.channel.poll([P.CHECKIN, P.FAILED]):
            self._handle(msg)

    def gather(self) -> list[str]:
        """Wait up to ``schedule_timeout`` for ``clients`` check-ins.

        Starts with fewer (with a warning) if at least ``min_clients`` came.

        Raises:
            FedAvgError: fewer than ``min_clients`` checked in.
        """
        want = self.expected_clients
        deadline = time.monotonic() + self.config.schedule_timeout
        log.info(
            "aggregator: waiting for %d client(s) to check in (up to %g s)",
            want,
            self.config.schedule_timeout,
        )
        notice = WaitNotice(log, "aggregator: waiting for check-ins", deadline)
        while len(self.clients) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if self._nobody_else():
                break  # the clients that failed leave too few to wait for
            notice.what = (
                f"aggregator: {len(self.clients)} of {want} clients checked in; waiting for "
                + ", ".join(sorted(set(self.channel.peers) - set(self.clients) - set(self.failed)))
            )
            try:
                msg = self.channel.receive([P.CHECKIN, P.FAILED], timeout=min(left, notice.slice()))
            except ChannelTimeoutError:
                continue
            self._handle(msg)
        if len(self.clients) < self.config.min_clients:
            absent = sorted(set(self.channel.peers) - set(self.clients) - set(self.failed))
            failed = "; ".join(f"{k} failed: {v}" for k, v in sorted(self.failed.items()))
            raise FedAvgError(
                f"only {len(self.clients)} of {want} clients checked in "
                + ("" if failed else f"within schedule_timeout={self.config.schedule_timeout:g} s ")
                + f"(min_clients={self.config.min_clients}); "
                + (f"{failed}; " if failed else "")
                + f"not heard from: {', '.join(absent) or '-'}; "
                "hint: start the clients, check they use the same channel URL and task id, "
                "or raise schedule_timeout"
            )
        if len(self.clients) < want:
            log.warning(
                "aggregator: starting with %d of %d clients after schedule_timeout",
                len(self.clients),
                want,
            )
        return sorted(self.clients)

    def _nobody_else(self) -> bool:
        """Whether failures leave no client that could still check in, or too few."""
        could = len(self.channel.peers) - len(self.failed)
        return could < self.config.min_clients or len(self.clients) >= could

    def _gone(self, waiting: set[str]) -> dict[str, str]:
        """Those of ``waiting`` whose process is gone: no longer waited for (removed from
        ``waiting``), dropped from the federation until they check in again."""
        gone = self.watch.gone(waiting)
        for node, why in sorted(gone.items()):
            waiting.discard(node)
            self.clients.pop(node, None)
            self.failed[node] = f"its process is gone: {why}"
            log.warning("aggregator: client %s is gone (%s); going on without it", node, why)
        return gone

    def _answer(
        self, kind: str, round: int, waiting: set[str], rejected: dict[str, str], timeout: float
    ) -> Message | None:
        """The next ``kind`` message, or None after handling what came instead (a
        check-in; a failure report or a corrupt blob of a waited-for client, which
        ends the wait for it, named in ``rejected``) or when nothing came in time."""
        try:
            msg = self.channel.receive(
                [kind, P.CHECKIN, P.FAILED], timeout=min(timeout, self.watch.every)
            )
        except ChannelTimeoutError:
            return None
        except BlobIntegrityError as exc:
            if exc.round == round and exc.sender in waiting:
                rejected[exc.sender] = exc.reason
                waiting.discard(exc.sender)
            return None
        if msg.kind == P.CHECKIN:
            self.handle_checkin(msg)
            return None
        if msg.kind == P.FAILED:
            reason = self.handle_failed(msg)
            if reason is not None and msg.sender in waiting:
                how = "it left" if msg.sender in self.left else "it stopped with an error"
                rejected[msg.sender] = f"{how}: {reason}"
                waiting.discard(msg.sender)
            return None
        return msg

    # -- one answer from each of a set of clients -------------------------------------
    def collect(
        self,
        kind: str,
        round: int,
        attempt: str,
        waiting: set[str],
        deadline: float,
        take: Callable[[Message], str | None],
        rejected: dict[str, str],
        what: str,
        done: Callable[[], bool] | None = None,
    ) -> None:
        """Receive one ``kind`` message of this round's ``attempt`` from each client in
        ``waiting`` (emptied as they answer) until none is left, ``done()`` says enough
        came, or ``deadline`` passes.

        ``take(msg)`` uses a message and returns None, or why it cannot be used: the
        sender is then named in ``rejected`` and not waited for. A client's failure
        report ends the wait for it at once (named in ``rejected`` too); check-ins are
        handled; other rounds' messages are dropped.
        """
        notice = WaitNotice(log, f"aggregator: round {round} waits for {what}", deadline)
        while waiting and not (done is not None and done()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            notice.what = (
                f"aggregator: round {round} waits for {what} from {', '.join(sorted(waiting))}"
            )
            for node, why in self._gone(waiting).items():
                rejected[node] = f"its process is gone: {why}"
            msg = self._answer(kind, round, waiting, rejected, min(left, notice.slice()))
            if msg is None:
                continue
            if not _answers_this_round(msg, round, attempt) or msg.sender not in waiting:
                log.debug("aggregator: dropped a %s from %s of another round", kind, msg.sender)
                continue
            waiting.discard(msg.sender)
            problem = take(msg)
            if problem is not None:
                log.warning(
                    "aggregator: round %d: refused the %s of %s: %s",
                    round,
                    kind,
                    msg.sender,
                    problem,
                )
                rejected[msg.sender] = problem

    # -- rounds --------------------------------------------------------------------
    def run_round(
        self,
        round: int,
        global_state: Mapping[str, torch.Tensor],
        expected: Mapping[str, TensorSpec],
    ) -> RoundResult:
        """Send the global tensors to the round's clients and fold what comes back.

        The algorithm's round tensors travel with the global model; each update's
        model and extras are checked before the algorithm's statistic folds them in.

        Raises:
            RoundFailedError: fewer than ``min_clients`` usable updates arrived in time.
        """
        cfg = self.config
        started = time.monotonic()
        self.poll_checkins()
        # Under differential privacy the sample must stay secret (privacy amplification by
        # subsampling assumes nobody can tell who was drawn): draw it from os.urandom.
        seed = cfg.seed if self.privacy is None else secrets.randbits(64)
        chosen = sample_clients(self.clients, cfg.clients_per_round, seed=seed, round=round)
        if len(chosen) < cfg.min_clients:
            raise RoundFailedError(
                f"round {round}: only {len(chosen)} client(s) available, min_clients="
                f"{cfg.min_clients}; hint: start more clients or lower min_clients"
            )
        attempt = secrets.token_hex(8)
        algorithm = self.algorithm
        spec = None
        if cfg.secure_aggregation is not None:
            spec = cfg.secure_aggregation.for_round(len(chosen))
        privacy = self.privacy
        noise = None
        if privacy is not None and spec is not None:
            noise = privacy.round_noise(len(chosen)).to_body()
        body = P.RoundStart(
            attempt,
            cfg.epochs_per_round,
            {c: self.clients[c] for c in chosen},
            cfg.local_steps,
            algorithm.describe(),
            cfg.evaluate_on_clients,
            cfg.optimizer_state,
            None if spec is None else spec.to_body(),
            noise,
        )
        tensors = with_extras(global_state, algorithm.round_tensors())
        self.channel.send(P.ROUND, P.body_of(body), to=chosen, round=round, tensors=tensors)
        del tensors
        log.info("aggregator: round %d started with %s", round, ", ".join(chosen))
        idle = sorted(set(self.clients) - set(chosen))
        if idle:  # so that clients left out of many rounds in a row do not time out
            standby = P.Standby({c: self.clients[c] for c in idle})
            self.channel.send(P.STANDBY, P.body_of(standby), to=idle, round=round)

        if privacy is not None and spec is None:
            statistic = privacy.statistic(global_state, len(chosen))
        else:
            statistic = algorithm.statistic()
        waiting = set(chosen)
        samples: dict[str, int] = {}
        metrics: dict[str, dict[str, float]] = {}
        rejected: dict[str, str] = {}
        evaluations: dict[str, Evaluation] = {}
        lost: dict[str, str] = {}  # chosen clients whose process is gone
        upload = with_extras(expected, algorithm.upload_spec())
        secure = None
        if spec is not None:
            from lightning_fed.fedavg.secure_aggregator import SecureRoundServer

            assert cfg.secure_aggregation is not None
            extra = {} if privacy is None else privacy.secure_extras()
            layout = Layout.of(expected, {**algorithm.upload_spec(), **extra})
            secure = SecureRoundServer(
                self, cfg.secure_aggregation, spec, round, attempt, chosen, layout
            )
            waiting = set(secure.prepare(rejected))
            upload = secure.upload_spec
        deadline = started + cfg.calculation_timeout
        notice = WaitNotice(log, f"aggregator: round {round} waits for updates", deadline)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if len(samples) + len(waiting) < cfg.min_clients:
                break  # failures already decided the round
            notice.what = (
                f"aggregator: round {round} has {len(samples)} of {len(chosen)} updates; "
                f"waiting for {', '.join(sorted(waiting))}"
            )
            lost.update(self._gone(waiting))
            if not waiting:
                break
            msg = self._answer(P.UPDATE, round, waiting, rejected, min(left, notice.slice()))
            if msg is None:
                continue
            problem, update = self._judge(msg, round, attempt, waiting, upload)
            if update is None or problem is not None:
                log.warning(
                    "aggregator: rejected the update of %s (round %d): %s",
                    msg.sender,
                    msg.round,
                    problem,
                )
                if _answers_this_round(msg, round, attempt) and msg.sender in waiting:
                    rejected[msg.sender] = str(problem)  # it will not send another one
                    waiting.discard(msg.sender)
                continue
            tensors, states = split_evaluation(msg.tensors)
            if secure is not None:
                problem = secure.add(msg.sender, tensors, update)
                if problem is not None:
                    log.warning("aggregator: rejected the update of %s: %s", msg.sender, problem)
                    rejected[msg.sender] = problem
                    waiting.discard(msg.sender)
                    continue
            else:
                model, extras = split_extras(tensors)
                statistic.add(ClientUpdate(msg.sender, model, update.num_samples, extras))
                del model, extras
            del tensors
            if update.evaluation is not None:
                evaluation = self._evaluation(update.evaluation, states, msg.sender)
                if evaluation is not None:
                    evaluations[msg.sender] = evaluation
            samples[msg.sender] = update.num_samples if secure is None else 0  # masked
            metrics[msg.sender] = update.metrics
            waiting.discard(msg.sender)
            del msg  # frees the received blob before the next one is read
        self.channel.prune_sent()
        if len(samples) < cfg.min_clients:
            detail = "; ".join(f"{k}: {v}" for k, v in sorted(rejected.items()))
            raise RoundFailedError(
                f"round {round}: {len(samples)} usable update(s), min_clients={cfg.min_clients}"
                + (
                    f"; no update from {', '.join(sorted(waiting))} within calculation_timeout="
                    f"{cfg.calculation_timeout:g} s"
                    if waiting and time.monotonic() >= deadline
                    else ""
                )
                + (f"; rejected {detail}" if detail else "")
                + "".join(f"; {k} is gone: {v}" for k, v in sorted(lost.items()))
                + "; hint: check the clients' logs"
                + (", or raise calculation_timeout" if waiting else "")
            )
        if waiting:
            log.warning(
                "aggregator: round %d goes on without %s (no update within %g s)",
                round,
                ", ".join(sorted(waiting)),
                cfg.calculation_timeout,
            )
        aggregate = statistic.result() if secure is None else secure.result(global_state, rejected)
        spent = None
        if privacy is not None:
            spent = privacy.finish_round(
                len(chosen),
                len(self.clients),
                aggregate.clients,
                aggregate.extras if secure is not None else None,
            )
        return RoundResult(
            round=round,
            aggregate=aggregate,
            samples=samples,
            metrics=metrics,
            rejected=rejected,
            missing=sorted(waiting | set(lost)),
            seconds=time.monotonic() - started,
            evaluations=evaluations,
            privacy=spent,
        )

    def _judge(
        self,
        msg: Message,
        round: int,
        attempt: str,
        waiting: set[str],
        expected: Mapping[str, TensorSpec],
    ) -> tuple[str | None, P.Update | None]:
        """Why an update cannot be averaged (None if it can), and the parsed update."""
        try:
            update = P.Update.parse(msg.body, msg.sender)
        except P.ProtocolError as exc:
            return str(exc), None
        if msg.round != round:
            return f"it belongs to round {msg.round}, not the current round {round}", None
        if update.attempt != attempt:
            return "it answers an earlier start of this round (stale)", None
        if self.clients.get(msg.sender) != update.instance:
            return "it comes from a superseded process of this client", None
        if msg.sender not in waiting:
            return "its sender was not asked for an update in this round or already sent one", None
        tensors, _ = split_evaluation(msg.tensors)
        problems = update_problems(expected, tensors)
        if problems:
            return "bad weights: " + "; ".join(problems[:5]), update
        return None, update

    @staticmethod
    def _evaluation(
        body: Mapping[str, Any], states: Mapping[str, torch.Tensor], sender: str
    ) -> Evaluation | None:
        try:
            return Evaluation.decode(body, states, sender)
        except ValueError as exc:  # the update itself is fine; only its evaluation is not
            log.warning("aggregator: ignored the evaluation of %s: %s", sender, exc)
            return None

    # -- the end -------------------------------------------------------------------
    def finish(
        self,
        final_state: Mapping[str, torch.Tensor],
        report: dict[str, Any],
        evaluate_round: int | None = None,
    ) -> None:
        """Publish the final global tensors and the report to every client.

        Args:
            evaluate_round: ask every client to validate the final model, reporting
                it as this round's (see :meth:`collect_evaluations`).
        """
        if self.clients:
            body: dict[str, Any] = {"report": report, "instances": dict(self.clients)}
            if evaluate_round is not None:
                body["evaluate_round"] = evaluate_round
            self.channel.send(P.FINISH, body, to=sorted(self.clients), tensors=final_state)

    def collect_evaluations(
        self, round: int, phase: str = "validate", timeout: float | None = None
    ) -> dict[str, Evaluation]:
        """Every client's validation (after a finish that asked for it) or test (after
        its own ``trainer.test``) of the final model.

        Waits until each finished client answered, said it failed, or ``timeout``
        (default ``calculation_timeout``) passed, then goes on with what came.
        """
        waiting = set(self.clients)
        got: dict[str, Evaluation] = {}
        wait = self.config.calculation_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        what = "validation" if phase == "validate" else "test"
        notice = WaitNotice(log, f"aggregator: waiting for the clients' final {what}", deadline)
        came_early = self.early.pop(phase, [])
        while waiting and (left := deadline - time.monotonic()) > 0:
            notice.what = (
                f"aggregator: waiting for the final {what} of {', '.join(sorted(waiting))}"
            )
            if came_early:
                msg = came_early.pop(0)
            else:
                try:
                    msg = self.channel.receive(
                        [P.EVALUATION, P.FAILED], timeout=min(left, notice.slice())
                    )
                except ChannelTimeoutError:
                    continue
                except BlobIntegrityError as exc:
                    waiting.discard(exc.sender)
                    continue
            if msg.kind == P.FAILED:
                if self.handle_failed(msg) is not None:
                    waiting.discard(msg.sender)
                continue
            try:
                report = P.EvaluationReport.parse(msg.body, msg.sender)
            except P.ProtocolError as exc:
                log.warning("aggregator: ignored a malformed evaluation: %s", exc)
                continue
            if report.phase != phase and self.clients.get(msg.sender) == report.instance:
                self.early.setdefault(report.phase, []).append(msg)  # for its own phase
                continue
            if self.clients.get(msg.sender) != report.instance or msg.sender not in waiting:
                continue
            waiting.discard(msg.sender)
            _, states = split_evaluation(msg.tensors)
            evaluation = self._evaluation(report.evaluation, states, msg.sender)
            if evaluation is not None and evaluation.round == round:
                got[msg.sender] = evaluation
        if waiting:
            log.warning(
                "aggregator: no final %s from %s within %g s",
                what,
                ", ".join(sorted(waiting)),
                wait,
            )
        return got

    def publish_report(self, report: dict[str, Any]) -> None:
        """Send the report with the final test's metrics to every checked-in client."""
        if self.clients:
            body = P.body_of(P.Report(report, dict(self.clients)))
            self.channel.send(P.REPORT, body, to=sorted(self.clients))

    def abort(self, reason: str) -> None:
        """Tell every client the federation failed, so none waits for its timeout.

        Checked-in clients get ``abort``; clients whose check-in is waiting unanswered get
        a refusal of that check-in (addressed to their process, so a client started
        later never mistakes it for its own).
        """
        reason = reason[:4000]
        if self.clients:
            self.channel.send(P.ABORT, {"reason": reason}, to=sorted(self.clients))
        for msg in self.channel.poll(P.CHECKIN):
            try:
                checkin = P.CheckIn.parse(msg.body, msg.sender)
            except P.ProtocolError:
                continue
            if self.clients.get(msg.sender) == checkin.instance:
                continue  # told by the abort
            refusal = P.CheckInAck(
                checkin.instance, self.channel.node_id, self.config.rounds, False, reason
            )
            self.channel.send(P.CHECKIN_ACK, P.body_of(refusal), to=msg.sender)
