"""The FedAvg round protocol's messages: kinds and bodies, parsed defensively.

Sequence (see docs/fedavg.md for the diagram)::

    client      -> every peer   checkin       {instance}                      (repeated until acked)
    aggregator  -> client       checkin-ack   {instance, rounds, ...}
    aggregator  -> sampled      round         {attempt, instances, local_epochs, local_steps}
                                                                                + global weights
    aggregator  -> the others   standby       {}     (not picked this round; keep waiting)
    client      -> aggregator   update        {attempt, instance, num_samples, metrics} + weights
    aggregator  -> every client finish        {report, instances}   + final weights
    aggregator  -> every client abort         {reason}              (the federation failed)
    client      -> aggregator   failed        {instance, reason}    (this client stopped; the
                                                                     aggregator goes on without it)
    aggregator  -> every client report        {report}   (after its final test, with test_metrics)

Bodies come from peers, so every field is checked before use; a malformed body is a
:class:`ProtocolError` naming the sender and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

CHECKIN = "checkin"
CHECKIN_ACK = "checkin-ack"
ROUND = "round"
STANDBY = "standby"
UPDATE = "update"
FINISH = "finish"
REPORT = "report"
ABORT = "abort"
FAILED = "failed"

#: The largest sample count an update may claim (exact in float64).
MAX_SAMPLES = 2**53

#: Instructions a client waits for between rounds.
INSTRUCTIONS = (ROUND, FINISH, ABORT)


class ProtocolError(ValueError):
    """A peer's message body does not follow the FedAvg protocol."""


T = TypeVar("T")


def _field(body: Mapping[str, Any], name: str, kind: type[T], what: str) -> T:
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{what}: field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def _metrics(body: Mapping[str, Any], what: str) -> dict[str, float]:
    raw = body.get("metrics", {})
    if not isinstance(raw, dict):
        raise ProtocolError(f"{what}: field 'metrics' must be an object, got {raw!r}")
    out = {}
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ProtocolError(f"{what}: metric {k!r} must be a number, got {v!r}")
        try:
            out[str(k)] = float(v)
        except OverflowError:
            raise ProtocolError(f"{what}: metric {k!r} is out of range") from None
    return out


@dataclass(frozen=True)
class CheckIn:
    instance: str

    @classmethod
    def parse(cls, body: Mapping[str, Any], sender: str) -> CheckIn:
        return cls(_field(body, "instance", str, f"checkin from {sender!r}"))


@dataclass(frozen=True)
class CheckInAck:
    instance: str
    aggregator: str
    rounds: int
    accepted: bool = True
    reason: str = ""

    @classmethod
    def parse(cls, body: Mapping[str, Any], sender: str) -> CheckInAck:
        what = f"checkin-ack from {sender!r}"
        return cls(
            instance=_field(body, "instance", str, what),
            aggregator=_field(body, "aggregator", str, what),
            rounds=_field(body, "rounds", int, what),
            accepted=_field(body, "accepted", bool, what),
            reason=str(body.get("reason", "")),
        )


@dataclass(frozen=True)
class RoundStart:
    """A round's instruction: train ``local_steps`` optimizer steps if set, else epochs."""

    attempt: str
    local_epochs: int
    instances: dict[str, str] = field(default_factory=dict)
    local_steps: int | None = None

    @classmethod
    def parse(cls, body: Mapping[str, Any], sender: str) -> RoundStart:
        what = f"round from {sender!r}"
        instances = _instances(body, what)
        epochs = _field(body, "local_epochs", int, what)
        if epochs < 1:
            raise ProtocolError(f"{what}: local_epochs must be >= 1, got {epochs}")
        steps = body.get("local_steps")
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise ProtocolError(f"{what}: local_steps must be null or an int >= 1, got {steps!r}")
        return cls(_field(body, "attempt", str, what), epochs, dict(instances), steps)


def _instances(body: Mapping[str, Any], what: str) -> dict[str, str]:
    instances = _field(body, "instances", dict, what)
    if not all(isinstance(v, str) for v in instances.values()):
        raise ProtocolError(f"{what}: field 'instances' must map node ids to strings")
    return dict(instances)


@dataclass(frozen=True)
class Standby:
    """A round's notice to the clients left out of it: keep waiting."""

    instances: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: Mapping[str, Any], sender: str) -> Standby:
        return cls(_instances(body, f"standby from {sender!r}"))


@dataclass(frozen=True)
class Report:
    """The aggregator's report after its final test, for the processes that finished."""

    report: dict[str, Any]
    instances: dict[str, str] = field(default_factory=dict)

    @property
    def test_metrics(self) -> dict[str, float]:
        return dict(self.report["test_metrics"])

    @classmethod
    def parse(cls, body: Mapping[str, Any], sender: str) -> Report:
        what = f"report from {sender!r}"
        report = dict(_field(body, "report", dict, what))
        report["test_metrics"] = _metrics(
            {"metrics": report.get("test_metrics")}, f"{what}: test_metrics"
        )
        return cls(report, _instances(body, what))


@dataclass(frozen=True)
class Failed:
    """A client's last word: it stopped with an error (the aggregator goes on without it)."""

    instance: str
    reason: str

    @classmethod
    def parse(cls, body: Mapping[str, Any], sender: str) -> Failed:
        what = f"failed from {sender!r}"
        return cls(_field(body, "instance", str, what), _field(body, "reason", str, what)[:4000])


@dataclass(frozen=True)
class Update:
    attempt: str
    instance: str
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: Mapping[str, Any], sender: str) -> Update:
        what = f"update from {sender!r}"
        n = _field(body, "num_samples", int, what)
        if not 1 <= n <= MAX_SAMPLES:
            raise ProtocolError(f"{what}: num_samples must be in [1, 2**53], got {n}")
        return cls(
            attempt=_field(body, "attempt", str, what),
            instance=_field(body, "instance", str, what),
            num_samples=n,
            metrics=_metrics(body, what),
        )


def body_of(message: Any) -> dict[str, Any]:
    """A protocol dataclass as a JSON-ready message body (non-finite floats dropped)."""
    body = asdict(message)
    if "metrics" in body:
        body["metrics"] = {k: v for k, v in body["metrics"].items() if math.isfinite(v)}
    return body
