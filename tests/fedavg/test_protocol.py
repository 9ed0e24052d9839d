"""The round protocol's message bodies (parsed defensively) and FedAvgConfig validation."""

from __future__ import annotations

import json
import math

import pytest

from lightning_fed.fedavg import protocol as P
from lightning_fed.fedavg.config import FedAvgConfig, resolve_role
from lightning_fed.fedavg.protocol import (
    CheckIn,
    CheckInAck,
    ProtocolError,
    RoundStart,
    Update,
    body_of,
)

SENDER = "node-7"


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        CheckIn("inst-1"),
        CheckInAck("inst-1", "agg", 10),
        CheckInAck("inst-1", "agg", 3, accepted=False, reason="duplicate node id"),
        RoundStart("a1b2", 2, {"c1": "inst-1", "c2": "inst-2"}),
        RoundStart("a1b2", 1),
        Update("a1b2", "inst-1", 640, {"loss": 0.25, "acc": 1.0}),
        Update("a1b2", "inst-1", 1),
    ],
    ids=repr,
)
def test_round_trip_through_body_of(message):
    body = body_of(message)
    # Bodies travel as JSON, so they must survive it.
    wire = json.loads(json.dumps(body, allow_nan=False))
    assert type(message).parse(wire, SENDER) == message


def test_message_kinds():
    assert P.INSTRUCTIONS == (P.ROUND, P.FINISH, P.ABORT)
    kinds = [P.CHECKIN, P.CHECKIN_ACK, P.ROUND, P.UPDATE, P.FINISH, P.ABORT]
    assert len(set(kinds)) == len(kinds)


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


def test_body_of_drops_non_finite_metrics():
    update = Update("a", "i", 5, {"loss": math.nan, "acc": 0.5, "up": math.inf, "dn": -math.inf})
    body = body_of(update)
    assert body["metrics"] == {"acc": 0.5}
    json.dumps(body, allow_nan=False)  # serialisable without NaN/Infinity
    assert update.metrics["loss"] != update.metrics["loss"]  # the message itself is untouched


def test_body_of_copies_containers():
    start = RoundStart("a", 1, {"c1": "i1"})
    body = body_of(start)
    body["instances"]["c2"] = "i2"
    assert start.instances == {"c1": "i1"}


def test_update_metrics_default_and_int_metrics():
    assert Update.parse({"attempt": "a", "instance": "i", "num_samples": 2}, SENDER).metrics == {}
    parsed = Update.parse(
        {"attempt": "a", "instance": "i", "num_samples": 2, "metrics": {"steps": 3}}, SENDER
    )
    assert parsed.metrics == {"steps": 3.0}
    assert isinstance(parsed.metrics["steps"], float)


def test_checkin_ack_reason_defaults_to_empty():
    ack = CheckInAck.parse(
        {"instance": "i", "aggregator": "agg", "rounds": 2, "accepted": True}, SENDER
    )
    assert ack.reason == ""


# -- malformed bodies ----------------------------------------------------------------


def good_body(cls):
    return {
        CheckIn: {"instance": "inst-1"},
        CheckInAck: {"instance": "i", "aggregator": "agg", "rounds": 3, "accepted": True},
        RoundStart: {"attempt": "a", "local_epochs": 1, "instances": {"c1": "i1"}},
        Update: {"attempt": "a", "instance": "i", "num_samples": 10, "metrics": {"loss": 1.0}},
    }[cls]


def without(body, key):
    return {k: v for k, v in body.items() if k != key}


def replaced(body, **changes):
    return {**body, **changes}


CASES = [
    # (parser, body, field named in the error)
    (CheckIn, {}, "instance"),
    (CheckIn, {"instance": 5}, "instance"),
    (CheckIn, {"instance": None}, "instance"),
    (CheckInAck, without(good_body(CheckInAck), "instance"), "instance"),
    (CheckInAck, without(good_body(CheckInAck), "aggregator"), "aggregator"),
    (CheckInAck, without(good_body(CheckInAck), "rounds"), "rounds"),
    (CheckInAck, without(good_body(CheckInAck), "accepted"), "accepted"),
    (CheckInAck, replaced(good_body(CheckInAck), rounds="3"), "rounds"),
    (CheckInAck, replaced(good_body(CheckInAck), rounds=3.0), "rounds"),
    (CheckInAck, replaced(good_body(CheckInAck), rounds=True), "rounds"),
    (CheckInAck, replaced(good_body(CheckInAck), accepted=1), "accepted"),
    (CheckInAck, replaced(good_body(CheckInAck), accepted="yes"), "accepted"),
    (RoundStart, without(good_body(RoundStart), "attempt"), "attempt"),
    (RoundStart, without(good_body(RoundStart), "local_epochs"), "local_epochs"),
    (RoundStart, without(good_body(RoundStart), "instances"), "instances"),
    (RoundStart, replaced(good_body(RoundStart), attempt=7), "attempt"),
    (RoundStart, replaced(good_body(RoundStart), local_epochs=True), "local_epochs"),
    (RoundStart, replaced(good_body(RoundStart), local_epochs=0), "local_epochs"),
    (RoundStart, replaced(good_body(RoundStart), local_epochs=-2), "local_epochs"),
    (RoundStart, replaced(good_body(RoundStart), local_epochs=1.0), "local_epochs"),
    (RoundStart, replaced(good_body(RoundStart), local_steps=0), "local_steps"),
    (RoundStart, replaced(good_body(RoundStart), local_steps=True), "local_steps"),
    (RoundStart, replaced(good_body(RoundStart), local_steps=2.0), "local_steps"),
    (RoundStart, replaced(good_body(RoundStart), local_steps="5"), "local_steps"),
    (RoundStart, replaced(good_body(RoundStart), instances=["c1"]), "instances"),
    (RoundStart, replaced(good_body(RoundStart), instances={"c1": 1}), "instances"),
    (Update, without(good_body(Update), "attempt"), "attempt"),
    (Update, without(good_body(Update), "instance"), "instance"),
    (Update, without(good_body(Update), "num_samples"), "num_samples"),
    (Update, replaced(good_body(Update), num_samples=True), "num_samples"),
    (Update, replaced(good_body(Update), num_samples=0), "num_samples"),
    (Update, replaced(good_body(Update), num_samples=-5), "num_samples"),
    (Update, replaced(good_body(Update), num_samples=10.0), "num_samples"),
    (Update, replaced(good_body(Update), num_samples="10"), "num_samples"),
    (Update, replaced(good_body(Update), instance=["i"]), "instance"),
    (Update, replaced(good_body(Update), metrics=[1.0]), "metrics"),
    (Update, replaced(good_body(Update), metrics="loss=1"), "metrics"),
    (Update, replaced(good_body(Update), metrics={"loss": "1.0"}), "loss"),
    (Update, replaced(good_body(Update), metrics={"loss": None}), "loss"),
    (Update, replaced(good_body(Update), metrics={"loss": True}), "loss"),
    (Update, replaced(good_body(Update), metrics={"loss": [1.0]}), "loss"),
]


@pytest.mark.parametrize(("cls", "body", "field"), CASES)
def test_malformed_body_raises_protocol_error_naming_sender_and_field(cls, body, field):
    with pytest.raises(ProtocolError) as info:
        cls.parse(body, SENDER)
    text = str(info.value)
    assert repr(SENDER) in text
    assert field in text


@pytest.mark.parametrize("cls", [CheckIn, CheckInAck, RoundStart, Update])
def test_good_bodies_parse(cls):
    assert isinstance(cls.parse(good_body(cls), SENDER), cls)


def test_extra_fields_are_ignored():
    body = replaced(good_body(Update), future_field={"x": 1})
    assert Update.parse(body, SENDER).num_samples == 10


def test_huge_int_metric_is_a_protocol_error():
    body = replaced(good_body(Update), metrics={"loss": 10**400})
    with pytest.raises(ProtocolError, match="loss"):
        Update.parse(body, SENDER)


# -- FedAvgConfig ------------------------------------------------------------------


def test_config_defaults_are_valid():
    cfg = FedAvgConfig(role="client")
    assert cfg.rounds == 10 and cfg.clients_per_round is None and cfg.local_keys == ()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clients": 5, "min_clients": 5},
        {"clients": 5, "clients_per_round": 3, "min_clients": 2},
        {"clients": 5, "clients_per_round": 0.5},
        {"clients_per_round": 1.0},
        {"clients_per_round": 100},
        {"calculation_timeout": 0.5, "schedule_timeout": 1},
        {"local_keys": ["*running_mean", "*running_var"]},
        {"local_keys": ("*num_batches_tracked",)},
        {"seed": -3},
        {"aggregator": "agg-1"},
        {"local_steps": 7},
        {"local_epochs": 3},
        {"recovery": True},
    ],
)
def test_config_accepts_good_values(kwargs):
    FedAvgConfig(role="aggregator", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rounds": 0}, "rounds must be an int >= 1"),
        ({"rounds": -1}, "rounds"),
        ({"rounds": True}, "rounds"),
        ({"rounds": 2.0}, "rounds"),
        ({"clients": 0}, "clients must be an int >= 1"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"local_steps": 0}, "local_steps must be an int >= 1"),
        ({"local_steps": 2.5}, "local_steps"),
        ({"local_epochs": 1, "local_steps": 5}, "give local_epochs .* or local_steps .*not both"),
        ({"min_clients": 0}, "min_clients"),
        ({"log_rounds": 0}, "log_rounds"),
        ({"clients": 3, "min_clients": 4}, "min_clients=4 exceeds clients=3"),
        ({"clients_per_round": 0}, "clients_per_round"),
        ({"clients_per_round": 1.5}, "clients_per_round"),
        ({"clients_per_round": 0.0}, "clients_per_round"),
        ({"clients_per_round": math.nan}, "clients_per_round"),
        ({"clients_per_round": True}, "clients_per_round"),
        ({"clients_per_round": "2"}, "clients_per_round"),
        ({"clients_per_round": 2, "min_clients": 3}, "clients_per_round=2 is below min_clients=3"),
        ({"calculation_timeout": 0}, "calculation_timeout"),
        ({"calculation_timeout": math.inf}, "calculation_timeout"),
        ({"calculation_timeout": -1.0}, "calculation_timeout"),
        ({"calculation_timeout": math.nan}, "calculation_timeout"),
        ({"calculation_timeout": True}, "calculation_timeout"),
        ({"schedule_timeout": 0}, "schedule_timeout"),
        ({"schedule_timeout": math.inf}, "schedule_timeout"),
        ({"schedule_timeout": -5}, "schedule_timeout"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"local_keys": "*running_mean"}, "local_keys must be a list of glob patterns"),
        ({"local_keys": None}, "local_keys"),
        ({"aggregator": "../etc"}, "aggregator"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FedAvgConfig(role="aggregator", **kwargs)


@pytest.mark.parametrize(
    ("name", "value"),
    [("rounds", 0), ("clients_per_round", 1.5), ("calculation_timeout", -1.0), ("seed", 1.5)],
)
def test_config_errors_quote_the_value(name, value):
    with pytest.raises(ValueError, match=rf"{name} .*got {value!r}"):
        FedAvgConfig(role="aggregator", **{name: value})


# -- resolve_role ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "is_initiator", "want"),
    [
        ("client", None, "client"),
        ("aggregator", None, "aggregator"),
        (None, True, "aggregator"),
        (None, False, "client"),
        ("aggregator", True, "aggregator"),
        ("client", False, "client"),
    ],
)
def test_resolve_role(role, is_initiator, want):
    assert resolve_role(role, is_initiator) == want


@pytest.mark.parametrize(
    ("role", "is_initiator", "match"),
    [
        (None, None, "say which role"),
        ("client", True, "role='client' contradicts is_initiator=True"),
        ("aggregator", False, "role='aggregator' contradicts is_initiator=False"),
        ("server", None, "role must be 'client' or 'aggregator', got 'server'"),
        ("Client", None, "role must be"),
        ("server", True, "role must be"),
        ("", None, "role must be"),
    ],
)
def test_resolve_role_rejects(role, is_initiator, match):
    with pytest.raises(ValueError, match=match):
        resolve_role(role, is_initiator)


def test_round_start_carries_local_steps_or_none():
    body = body_of(RoundStart("a", 1, {"c1": "i1"}, 25))
    assert RoundStart.parse(body, "agg").local_steps == 25
    assert RoundStart.parse(good_body(RoundStart), "agg").local_steps is None  # epochs mode
    assert (
        RoundStart.parse({**good_body(RoundStart), "local_steps": None}, "agg").local_steps is None
    )


def test_config_counts_one_epoch_per_round_by_default():
    assert FedAvgConfig(role="aggregator").epochs_per_round == 1
    assert FedAvgConfig(role="aggregator", local_epochs=3).epochs_per_round == 3
    assert FedAvgConfig(role="aggregator", local_steps=9).local_steps == 9


def test_standby_and_report_parse_and_reject_malformed_bodies():
    assert P.Standby.parse({"instances": {"c1": "i1"}}, "agg").instances == {"c1": "i1"}
    with pytest.raises(P.ProtocolError, match="instances"):
        P.Standby.parse({}, "agg")
    good = {"report": {"test_metrics": {"test_acc": 0.9}, "clients": ["c1"]}, "instances": {}}
    parsed = P.Report.parse(good, "agg")
    assert parsed.test_metrics == {"test_acc": 0.9} and parsed.report["clients"] == ["c1"]
    for bad, words in (
        ({"instances": {}}, "report"),
        ({"report": {}, "instances": {}}, "test_metrics"),
        ({"report": {"test_metrics": {"acc": "high"}}, "instances": {}}, "must be a number"),
        ({"report": {"test_metrics": []}, "instances": {}}, "must be an object"),
        ({"report": {"test_metrics": {}}, "instances": {"c1": 5}}, "instances"),
    ):
        with pytest.raises(P.ProtocolError, match=words):
            P.Report.parse(bad, "agg")


def test_a_client_takes_only_the_report_naming_its_own_process(tmp_path):
    """A report left over from an earlier federation of the task is dropped."""
    from lightning_fed.channel import Channel, NodeIdentity, TaskConfig
    from lightning_fed.fedavg.client import ClientRole

    ids = {n: NodeIdentity.generate(n) for n in ("agg", "c1")}
    task = TaskConfig("t", {n: i.public_key_text for n, i in ids.items()})
    url = str(tmp_path / "channel")
    agg = Channel(url, task, ids["agg"]).connect()
    client = ClientRole(Channel(url, task, ids["c1"]).connect(), FedAvgConfig(role="client"))
    client.aggregator = "agg"

    def report(instance, acc):
        body = {"report": {"test_metrics": {"test_acc": acc}}, "instances": {"c1": instance}}
        agg.send(P.REPORT, body, to="c1")

    report("an-earlier-process", 0.1)
    report(client.instance, 0.9)
    got = client.receive_report(timeout=5)
    assert got is not None and got.test_metrics == {"test_acc": 0.9}
    report("an-earlier-process", 0.1)
    assert client.receive_report(timeout=0.3) is None  # nothing for this process: None


def test_a_test_that_comes_while_the_validation_is_collected_waits_for_its_turn(tmp_path):
    """A fast client's test of the final model can reach the aggregator while it still
    collects the others' validation: it is kept for the test's collection, not lost."""
    from lightning_fed.channel import Channel, NodeIdentity, TaskConfig
    from lightning_fed.fedavg.aggregator import AggregatorRole
    from lightning_fed.fedavg.client import ClientRole
    from lightning_fed.fedavg.evaluation import Evaluation

    ids = {n: NodeIdentity.generate(n) for n in ("agg", "c1", "c2")}
    task = TaskConfig("t", {n: i.public_key_text for n, i in ids.items()})
    url = str(tmp_path / "channel")
    clients = {}
    for node in ("c1", "c2"):
        role = ClientRole(Channel(url, task, ids[node]).connect(), FedAvgConfig(role="client"))
        role.aggregator = "agg"
        clients[node] = role
    instances = {n: r.instance for n, r in clients.items()}

    def send(node, phase, acc):
        body, states = Evaluation(3, 10, {f"{phase}_acc": acc}).encode()
        clients[node].send_evaluation(body, states, phase)

    send("c1", "validate", 0.5)
    send("c1", "test", 0.7)  # c1 is fast: its test comes before c2's validation
    send("c2", "validate", 0.6)
    config = FedAvgConfig(role="aggregator", calculation_timeout=120)
    channel = Channel(url, task, ids["agg"]).connect()
    early: dict[str, list] = {}
    validating = AggregatorRole(channel, config, instances, early=early)
    validated = validating.collect_evaluations(3, "validate", timeout=120)
    assert {n: e.metrics for n, e in validated.items()} == {
        "c1": {"validate_acc": 0.5},
        "c2": {"validate_acc": 0.6},
    }
    send("c2", "test", 0.8)
    testing = AggregatorRole(channel, config, instances, early=early)  # after trainer.test
    tested = testing.collect_evaluations(3, "test", timeout=120)
    assert {n: e.metrics for n, e in tested.items()} == {
        "c1": {"test_acc": 0.7},
        "c2": {"test_acc": 0.8},
    }
