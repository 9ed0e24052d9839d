"""A client's side of the protocol: check in, follow the aggregator's instructions, upload.

No Lightning here: :class:`ClientRole` talks to the aggregator over a connected
:class:`~lightning_fed.channel.Channel`; the strategy decides when to train.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lightning_fed.channel import Channel, ChannelTimeoutError, Message
from lightning_fed.fedavg import protocol as P
from lightning_fed.fedavg.config import FedAvgConfig
from lightning_fed.fedavg.errors import (
    FedAvgError,
    FederationAbortedError,
    RoundAbandonedError,
    SupersededError,
)
from lightning_fed.logs import WaitNotice

log = logging.getLogger(__name__)

#: Seconds the finish stays stored, so that a superseded process of this node sees it.
FINISH_GRACE = 0.5
#: Seconds between check-in attempts while no aggregator answers (grows to the maximum).
CHECKIN_RETRY = (2.0, 15.0)


@dataclass(frozen=True)
class Instruction:
    """What the aggregator asked for: train a round, or take the final model and stop."""

    kind: str  # protocol.ROUND or protocol.FINISH
    round: int
    tensors: dict[str, torch.Tensor] = field(repr=False)
    start: P.RoundStart | None = None
    report: dict[str, Any] = field(default_factory=dict)
    evaluate_round: int | None = None  # finish: validate the final model as this round


class ClientRole:
    """One client process: its check-in, its instructions, its uploads.

    Args:
        channel: a connected channel of this client node.
        config: the FedAvg settings (timeouts, optional aggregator id).
    """

    def __init__(self, channel: Channel, config: FedAvgConfig) -> None:
        self.channel = channel
        self.config = config
        self.instance = uuid.uuid4().hex
        self.aggregator: str | None = config.aggregator
        self.rounds: int | None = None
        self.current: Instruction | None = None
        self._ack_seq = -1  # sequence number of the aggregator's ack of this process
        self._unacked: Message | None = None
        self._held: Message | None = None  # an instruction that came during a secure step

    @property
    def instruction_timeout(self) -> float:
        """How long to wait for the next instruction: a whole round plus scheduling."""
        return self.config.calculation_timeout + self.config.schedule_timeout

    def check_in(self) -> P.CheckInAck:
        """Announce this process and wait for the aggregator's acknowledgement.

        Retries with growing pauses (the aggregator may start later) until
        ``schedule_timeout``.

        Raises:
            FedAvgError: no aggregator answered in time, or it refused this client.
        """
        deadline = time.monotonic() + self.config.schedule_timeout
        pause = CHECKIN_RETRY[0]
        to = self.aggregator  # None: every peer, the aggregator answers
        log.info(
            "client %s: checking in with %s (up to %g s)",
            self.channel.node_id,
            f"aggregator {to}" if to else "the aggregator",
            self.config.schedule_timeout,
        )
        notice = WaitNotice(
            log, f"client {self.channel.node_id}: still waiting for an aggregator", deadline
        )
        while True:
            self.channel.send(P.CHECKIN, {"instance": self.instance}, to=to)
            wait_until = min(deadline, time.monotonic() + pause)
            while (left := wait_until - time.monotonic()) > 0:
                try:
                    msg = self.channel.receive(
                        [P.CHECKIN_ACK, P.CHECKIN, P.FAILED],
                        timeout=min(left, notice.slice()),
                        consume=False,
                    )
                except ChannelTimeoutError:
                    continue
                ack = self._ack_for_me(msg)
                if ack is not None:
                    if not ack.accepted:
                        raise FedAvgError(f"the aggregator {msg.sender!r} refused: {ack.reason}")
                    self.aggregator, self.rounds = msg.sender, ack.rounds
                    self._ack_seq = msg.seq
                    log.info(
                        "client %s: checked in with aggregator %s (%d rounds)",
                        self.channel.node_id,
                        msg.sender,
                        ack.rounds,
                    )
                    return ack
            if time.monotonic() >= deadline:
                raise FedAvgError(
                    f"client {self.channel.node_id!r}: no aggregator acknowledged the check-in "
                    f"within schedule_timeout={self.config.schedule_timeout:g} s; hint: start "
                    "the aggregator, check the channel URL and task id, or raise schedule_timeout"
                )
            pause = min(pause * 2, CHECKIN_RETRY[1])

    def _ack_for_me(self, msg: Message) -> P.CheckInAck | None:
        """Consume and parse an acknowledgement of this process; drop peers' broadcasts."""
        if msg.kind in (P.CHECKIN, P.FAILED):
            self.channel.ack(msg)  # another client's broadcast check-in or failure: not for us
            return None
        try:
            ack = P.CheckInAck.parse(msg.body, msg.sender)
        except P.ProtocolError as exc:
            log.warning(
                "client %s: ignored a malformed check-in ack: %s", self.channel.node_id, exc
            )
            self.channel.ack(msg)
            return None
        if ack.instance != self.instance:
            return None  # another process with this node id; leave it for that one
        self.channel.ack(msg)
        return ack

    def next_instruction(self) -> Instruction:
        """Wait for the aggregator's next round or the finish.

        Raises:
            FederationAbortedError: the aggregator aborted the federation.
            SupersededError: a newer process of this node id took over.
            FedAvgError: nothing came within ``calculation_timeout + schedule_timeout``
                (a ``standby``, sent to clients left out of a round, starts it again).
        """
        if self.aggregator is None:
            raise FedAvgError("check_in() first: the aggregator is not known yet")
        kinds = [*P.INSTRUCTIONS, P.STANDBY, P.CHECKIN, P.CHECKIN_ACK, P.FAILED, *P.SECURE_STEPS]
        deadline = time.monotonic() + self.instruction_timeout
        last = -1 if self.current is None else self.current.round
        notice = WaitNotice(
            log,
            f"client {self.channel.node_id}: waiting for aggregator {self.aggregator}'s next "
            "instruction",
            deadline,
        )
        while (left := deadline - time.monotonic()) > 0:
            if self._held is not None:
                msg, self._held = self._held, None
            else:
                try:
                    msg = self.channel.receive(
                        kinds, timeout=min(left, notice.slice()), consume=False
                    )
                except ChannelTimeoutError:
                    continue
            if msg.kind in (P.CHECKIN, P.CHECKIN_ACK, P.FAILED):
                self._ack_for_me(msg)  # late duplicates and peers' broadcasts
                continue
            if msg.kind in P.SECURE_STEPS:
                self.channel.ack(msg)  # a step of a secure round this client left
                continue
            if msg.sender != self.aggregator:
                log.warning(
                    "client %s: ignored %s from %s, which is not the aggregator %s",
                    self.channel.node_id,
                    msg.kind,
                    msg.sender,
                    self.aggregator,
                )
                self.channel.ack(msg)
                continue
            if msg.kind == P.STANDBY:
                if not self._standby_for_me(msg):
                    continue
                log.info(
                    "client %s: not picked for round %d; waiting for the next",
                    self.channel.node_id,
                    msg.round,
                )
                deadline = time.monotonic() + self.instruction_timeout  # the aggregator lives
                notice.deadline = deadline
                continue
            instruction = self._instruction(msg, last)
            if instruction is not None:
                self.current = instruction
                return instruction
        raise FedAvgError(
            f"client {self.channel.node_id!r}: no instruction from aggregator "
            f"{self.aggregator!r} within {self.instruction_timeout:g} s (calculation_timeout + "
            "schedule_timeout); hint: check that the aggregator still runs"
        )

    def await_step(self, kind: str, timeout: float) -> Message:
        """The aggregator's next ``kind`` message of the current secure round.

        Raises:
            RoundAbandonedError: the aggregator moved on (a new round, a finish or a
                standby came first); :meth:`next_instruction` returns it.
            FederationAbortedError: the aggregator aborted the federation.
            FedAvgError: nothing came within ``timeout`` seconds.
        """
        current = self.current
        if current is None or current.start is None or self.aggregator is None:
            raise FedAvgError(f"{kind} outside a round: wait for next_instruction() first")
        attempt = current.start.attempt
        kinds = [kind, *P.INSTRUCTIONS, P.STANDBY, P.CHECKIN, P.CHECKIN_ACK, P.FAILED]
        deadline = time.monotonic() + timeout
        notice = WaitNotice(
            log, f"client {self.channel.node_id}: waiting for the aggregator's {kind}", deadline
        )
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.channel.receive(kinds, timeout=min(left, notice.slice()), consume=False)
            except ChannelTimeoutError:
                continue
            if msg.kind in (P.CHECKIN, P.CHECKIN_ACK, P.FAILED):
                self._ack_for_me(msg)
                continue
            if msg.sender != self.aggregator:
                self.channel.ack(msg)
                continue
            if msg.kind == kind:
                self.channel.ack(msg)
                if msg.round == current.round and msg.body.get("attempt") == attempt:
                    return msg
                continue  # a step of an earlier round or attempt
            if msg.kind == P.ABORT:
                self._instruction(msg, current.round)  # raises
            self._held = msg  # for next_instruction
            raise RoundAbandonedError(
                f"the aggregator sent a {msg.kind} (round {msg.round}) before this client's "
                f"{kind} of round {current.round}: it went on without this client"
            )
        raise FedAvgError(
            f"client {self.channel.node_id!r}: no {kind} from aggregator {self.aggregator!r} "
            f"within {timeout:g} s (secure aggregation's step timeout); hint: check that the "
            "aggregator still runs"
        )

    def send_step(
        self,
        kind: str,
        body: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Send one step of the current secure round to the aggregator."""
        current = self.current
        if current is None or current.start is None or self.aggregator is None:
            raise FedAvgError(f"{kind} outside a round: wait for next_instruction() first")
        self.channel.send(
            kind,
            {"attempt": current.start.attempt, **body},
            to=self.aggregator,
            round=current.round,
            tensors=tensors,
        )

    def _standby_for_me(self, msg: Message) -> bool:
        try:
            standby = P.Standby.parse(msg.body, msg.sender)
        except P.ProtocolError as exc:
            log.warning("client %s: ignored a malformed standby: %s", self.channel.node_id, exc)
            self.channel.ack(msg)
            return False
        if not self._mine(msg, standby.instances):
            return False  # an older process's; left stored like its other instructions
        self.channel.ack(msg)
        return True

    def _instruction(self, msg: Message, last: int) -> Instruction | None:
        if msg.kind == P.ABORT:
            self.channel.ack(msg)
            raise FederationAbortedError(
                f"the aggregator {msg.sender!r} aborted the federation: "
                f"{msg.body.get('reason', 'no reason given')}"
            )
        if msg.kind == P.FINISH:
            if not self._mine(msg, msg.body.get("instances")):
                return None
            self._settle(msg, grace=FINISH_GRACE)
            report = msg.body.get("report")
            evaluate = msg.body.get("evaluate_round")
            return Instruction(
                P.FINISH,
                msg.round,
                msg.tensors,
                report=report if isinstance(report, dict) else {},
                evaluate_round=evaluate if isinstance(evaluate, int) else None,
            )
        try:
            start = P.RoundStart.parse(msg.body, msg.sender)
        except P.ProtocolError as exc:
            log.warning("client %s: ignored a malformed round: %s", self.channel.node_id, exc)
            self.channel.ack(msg)
            return None
        if not self._mine(msg, start.instances):
            return None
        if msg.round < last:
            self.channel.ack(msg)
            log.warning(
                "client %s: ignored a stale start of round %d (now at %d)",
                self.channel.node_id,
                msg.round,
                last,
            )
            return None
        if msg.round == last:
            log.warning(
                "client %s: the aggregator restarted round %d; training it again",
                self.channel.node_id,
                msg.round,
            )
        self._settle(msg)
        return Instruction(P.ROUND, msg.round, msg.tensors, start=start)

    def _mine(self, msg: Message, instances: object) -> bool:
        """Whether an instruction is for this process (else it is left in storage).

        An instruction naming another process of this node id that was sent after
        this process checked in means a newer process took over: stop.
        """
        if not isinstance(instances, dict):
            return True  # an aggregator that does not name processes
        mine = instances.get(self.channel.node_id)
        if mine == self.instance:
            return True
        if msg.seq < self._ack_seq:
            return False  # meant for an older process of this node id
        raise SupersededError(
            f"node {self.channel.node_id!r} is now served by another process (instance "
            f"{mine}); this one ({self.instance}) stops; hint: run each node id once"
        )

    def _settle(self, msg: Message, grace: float = 0.0) -> None:
        """Delete the previous instruction now and keep this one stored until the next.

        Keeping an instruction a while lets an older process of the same node id see
        that it was superseded, instead of waiting for its timeout.
        """
        if self._unacked is not None:
            self.channel.ack(self._unacked)
        self._unacked = replace(msg, tensors={})  # the key, not the weights
        if grace:
            time.sleep(grace)
            self.channel.ack(msg)
            self._unacked = None

    def receive_report(self, timeout: float) -> P.Report | None:
        """Wait up to ``timeout`` seconds for the aggregator's report of its final test.

        Only a report naming this process (``instance``) counts: one left over from an
        earlier federation of the task, or a malformed one, is dropped with a log line.

        Returns:
            The report, or None when none came in time (the aggregator did not test).
        """
        if self.aggregator is None:
            raise FedAvgError("check_in() first: the aggregator is not known yet")
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.channel.receive(P.REPORT, sender=self.aggregator, timeout=left)
            except ChannelTimeoutError:
                break
            try:
                report = P.Report.parse(msg.body, msg.sender)
            except P.ProtocolError as exc:
                log.warning("client %s: ignored a malformed report: %s", self.channel.node_id, exc)
                continue
            if report.instances.get(self.channel.node_id) == self.instance:
                return report
            log.info("client %s: dropped a report of an earlier federation", self.channel.node_id)
        return None

    def report_failure(self, reason: str, left: bool = False) -> None:
        """Tell the aggregator (every peer while it is unknown) that this process stopped.

        The aggregator drops this client at once instead of waiting for its update
        until ``calculation_timeout``. ``left``: it stopped of its own accord, not by
        an error.
        """
        body = P.body_of(P.Failed(self.instance, reason[:4000], left))
        self.channel.send(P.FAILED, body, to=self.aggregator)

    def upload(
        self,
        tensors: Mapping[str, torch.Tensor],
        num_samples: int,
        metrics: Mapping[str, float],
        evaluation: dict[str, Any] | None = None,
        masked_with: list[str] | None = None,
    ) -> None:
        """Send this round's trained tensors and sample count to the aggregator.

        ``evaluation`` is the body of this client's validation of the round's global
        model; its state tensors are among ``tensors``. ``masked_with``: a secure
        round's masked vector, masked with these neighbours.
        """
        current = self.current
        if current is None or current.start is None or self.aggregator is None:
            raise FedAvgError("upload() outside a round: wait for next_instruction() first")
        update = P.Update(
            current.start.attempt,
            self.instance,
            num_samples,
            dict(metrics),
            evaluation,
            masked_with,
        )
        self.channel.prune_sent()
        self.channel.send(
            P.UPDATE, P.body_of(update), to=self.aggregator, round=current.round, tensors=tensors
        )

    def send_evaluation(
        self,
        evaluation: dict[str, Any],
        tensors: Mapping[str, torch.Tensor],
        phase: str = "validate",
    ) -> None:
        """Send this client's validation or test of the final model."""
        if self.aggregator is None:
            raise FedAvgError("check_in() first: the aggregator is not known yet")
        body = P.body_of(P.EvaluationReport(self.instance, evaluation, phase))
        self.channel.send(P.EVALUATION, body, to=self.aggregator, tensors=tensors or None)
