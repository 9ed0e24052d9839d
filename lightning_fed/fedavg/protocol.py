"""The FedAvg round protocol's messages: kinds and bodies, parsed defensively.

Sequence (see docs/fedavg.md for the diagram)::

    client      -> every peer   checkin       {instance}                      (repeated until acked)
    aggregator  -> client       checkin-ack   {instance, rounds, ...}
    aggregator  -> sampled      round         {attempt, instances, local_epochs, local_steps,
                                               algorithm, evaluate} + global weights (+ @extras)
    aggregator  -> the others   standby       {}     (not picked this round; keep waiting)
    client      -> aggregator   update        {attempt, instance, num_samples, metrics,
                                               evaluation} + weights (+ @extras, #states)
    aggregator  -> every client finish        {report, instances, evaluate} + final weights
    aggregator  -> every client abort         {reason}              (the federation failed)
    client      -> aggregator   failed        {instance, reason}    (this client stopped; the
                                                                     aggregator goes on without it)
    aggregator  -> every client report        {report}   (after its final test, with test_metrics)
    client      -> aggregator   evaluation    {instance, evaluation, phase} + metric states
                                              (validate: after a finish that asks for it;
                                               test: after the client's trainer.test)

With secure aggregation (``secure`` in the round body; see lightning_fed.privacy.secagg),
between the round and the update, every body carrying the round's ``attempt``::

    client      -> aggregator   secagg-keys     {attempt, c, s, commit}      (before training)
    aggregator  -> maskers-to-be secagg-roster  {attempt, adverts, degree, threshold, seed}
    client      -> aggregator   secagg-shares   {attempt} + a sealed share per neighbour
    aggregator  -> each client  secagg-relay    {attempt} + its neighbours' sealed shares
    client      -> aggregator   secagg-check    {attempt, rejected}    (then it trains)
    aggregator  -> maskers      secagg-maskers  {attempt, maskers}
    client      -> aggregator   update          {..., masked_with} + the masked vector
    aggregator  -> survivors    secagg-unmask   {attempt, survivors}
    client      -> aggregator   secagg-reveal   {attempt, b, s}    (shares, never both)

Bodies come from peers, so every field is checked before use; a malformed body is a
:class:`ProtocolError` naming the sender and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from lightning_fed.errors import LightningFedError

CHECKIN = "checkin"
CHECKIN_ACK = "checkin-ack"
ROUND = "round"
STANDBY = "standby"
UPDATE = "update"
FINISH = "finish"
REPORT = "report"
ABORT = "abort"
FAILED = "failed"
EVALUATION = "evaluation"
SA_KEYS = "secagg-keys"
SA_ROSTER = "secagg-roster"
SA_SHARES = "secagg-shares"
SA_RELAY = "secagg-relay"
SA_CHECK = "secagg-check"
SA_MASKERS = "secagg-maskers"
SA_UNMASK = "secagg-unmask"
SA_REVEAL = "secagg-reveal"
#: What a client waits for during a secure round, from the aggregator.
SECURE_STEPS = (SA_ROSTER, SA_RELAY, SA_MASKERS, SA_UNMASK)

#: The largest sample count an update may claim (exact in float64).
MAX_SAMPLES = 2**53

#: Instructions a client waits for between rounds.
INSTRUCTIONS = (ROUND, FINISH, ABORT)


class ProtocolError(LightningFedError, ValueError):
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


#: The algorithm a round names when the aggregator says none (an older aggregator).
DEFAULT_ALGORITHM: dict[str, Any] = {"name": "fedavg", "params": {}}


@dataclass(frozen=True)
class RoundStart:
    """A round's instruction: train ``local_steps`` optimizer steps if set, else epochs.

    ``algorithm`` names the federated algorithm and its parameters (``{"name",
    "params"}``); clients build their side of it from that.
    """

    attempt: str
    local_epochs: int
    instances: dict[str, str] = field(default_factory=dict)
    local_steps: int | None = None
    algorithm: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ALGORITHM))
    evaluate: bool = False  # validate the received global model before training
    optimizer_state: str = "keep"  # or "reset": clear the optimizers' state first
    secure: dict[str, Any] | None = None  # SecureRound's body: mask the update
    dp: dict[str, Any] | None = None  # DistributedNoise's body: clip and noise the update

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
        algorithm = body.get("algorithm", DEFAULT_ALGORITHM)
        if (
            not isinstance(algorithm, dict)
            or not isinstance(algorithm.get("name"), str)
            or not isinstance(algorithm.get("params", {}), dict)
        ):
            raise ProtocolError(
                f"{what}: algorithm must be an object with a string 'name' and an object "
                f"'params', got {algorithm!r}"
            )
        evaluate = body.get("evaluate", False)
        if not isinstance(evaluate, bool):
            raise ProtocolError(f"{what}: evaluate must be a boolean, got {evaluate!r}")
        optimizer_state = body.get("optimizer_state", "keep")
        if optimizer_state not in ("keep", "reset"):
            raise ProtocolError(
                f"{what}: optimizer_state must be 'keep' or 'reset', got {optimizer_state!r}"
            )
        attempt = _field(body, "attempt", str, what)
        secure = body.get("secure")
        if secure is not None and not isinstance(secure, dict):
            raise ProtocolError(f"{what}: secure must be null or an object, got {secure!r}")
        dp = body.get("dp")
        if dp is not None and (not isinstance(dp, dict) or secure is None):
            raise ProtocolError(
                f"{what}: dp must be null, or an object in a secure round, got {dp!r}"
            )
        return cls(
            attempt,
            epochs,
            dict(instances),
            steps,
            algorithm,
            evaluate,
            optimizer_state,
            secure,
            dp,
        )


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
    """A client's last word: it stopped with an error, or ``left`` of its own accord (its
    Trainer stopped, e.g. by ``EarlyStopping``); the aggregator goes on without it."""

    instance: str
    reason: str
    left: bool = False

    @classmethod
    def parse(cls, body: Mapping[str, Any], sender: str) -> Failed:
        what = f"failed from {sender!r}"
        left = body.get("left", False)
        if not isinstance(left, bool):
            raise ProtocolError(f"{what}: left must be a boolean, got {left!r}")
        instance, reason = _field(body, "instance", str, what), _field(body, "reason", str, what)
        return cls(instance, reason[:4000], left)


@dataclass(frozen=True)
class Update:
    """A client's trained tensors of a round; ``evaluation`` is its validation of the
    round's global model (see :mod:`lightning_fed.fedavg.evaluation`), if asked."""

    attempt: str
    instance: str
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    #: secure rounds: the neighbours this client masked with (its sample count is
    #: inside the masked vector; ``num_samples`` is then 1)
    masked_with: list[str] | None = None

    @classmethod
    def parse(cls, body: Mapping[str, Any], sender: str) -> Update:
        what = f"update from {sender!r}"
        n = _field(body, "num_samples", int, what)
        if not 1 <= n <= MAX_SAMPLES:
            raise ProtocolError(f"{what}: num_samples must be in [1, 2**53], got {n}")
        masked_with = body.get("masked_with")
        if masked_with is not None and (
            not isinstance(masked_with, list) or not all(isinstance(m, str) for m in masked_with)
        ):
            raise ProtocolError(f"{what}: masked_with must be a list of node ids")
        return cls(
            attempt=_field(body, "attempt", str, what),
            instance=_field(body, "instance", str, what),
            num_samples=n,
            metrics=_metrics(body, what),
            evaluation=_evaluation(body, what),
            masked_with=masked_with,
        )


def _evaluation(body: Mapping[str, Any], what: str) -> dict[str, Any] | None:
    value = body.get("evaluation")
    if value is not None and not isinstance(value, dict):
        raise ProtocolError(f"{what}: field 'evaluation' must be an object, got {value!r}")
    return value


#: What an evaluation message reports: the final model's validation or its test.
PHASES = ("validate", "test")


@dataclass(frozen=True)
class EvaluationReport:
    """A client's validation (after the finish) or test (after its own
    ``trainer.test``) of the final global model."""

    instance: str
    evaluation: dict[str, Any]
    phase: str = "validate"

    @classmethod
    def parse(cls, body: Mapping[str, Any], sender: str) -> EvaluationReport:
        what = f"evaluation from {sender!r}"
        evaluation = _evaluation(body, what)
        if evaluation is None:
            raise ProtocolError(f"{what}: field 'evaluation' is missing")
        phase = body.get("phase", "validate")
        if phase not in PHASES:
            raise ProtocolError(f"{what}: phase must be one of {PHASES}, got {phase!r}")
        return cls(_field(body, "instance", str, what), evaluation, phase)


def body_of(message: Any) -> dict[str, Any]:
    """A protocol dataclass as a JSON-ready message body (non-finite floats dropped)."""
    body = asdict(message)
    if "metrics" in body:
        body["metrics"] = {k: v for k, v in body["metrics"].items() if math.isfinite(v)}
    return body
