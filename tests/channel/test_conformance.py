"""The channel conformance suite, run against memory://, file:// and s3:// (moto server)."""

from __future__ import annotations

import time

import pytest
import torch

from lightning_fed.channel import (
    MAX_BODY_BYTES,
    ChannelError,
    ChannelTimeoutError,
    InvalidNameError,
    MessageTooLargeError,
    inspect_task,
    remove_task,
)
from lightning_fed.channel.channel import POLL_MAX_LOCAL, POLL_MAX_REMOTE
from tests.channel.helpers import Federation
from tests.conftest import Backend


@pytest.fixture
def fed() -> Federation:
    return Federation.make("agg", "c1", "c2")


def test_body_and_tensors_round_trip(backend: Backend, fed: Federation) -> None:
    agg, c1 = fed.channel(backend, "agg"), fed.channel(backend, "c1")
    tensors = {
        "conv.weight": torch.randn(4, 3, 5, 5),
        "bn.num_batches_tracked": torch.tensor(7),
        "half": torch.randn(3, 2).to(torch.bfloat16),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "ids": torch.arange(10, dtype=torch.int64),
    }
    seq = c1.send("update", {"n": 128, "loss": 0.25}, to="agg", round=3, tensors=tensors)
    msg = agg.receive("update", sender="c1", round=3, timeout=10)
    assert (msg.sender, msg.recipient, msg.kind, msg.round, msg.seq) == (
        "c1",
        "agg",
        "update",
        3,
        seq,
    )
    assert msg.body == {"n": 128, "loss": 0.25}
    assert msg.tensors.keys() == tensors.keys()
    for name, t in tensors.items():
        assert msg.tensors[name].dtype == t.dtype
        assert torch.equal(msg.tensors[name], t)


def test_large_tensors_round_trip(backend: Backend, fed: Federation) -> None:
    big = {"w": torch.randn(1024, 1024), "b": torch.randn(1024).half()}  # 4 MB: mmap buffer
    fed.channel(backend, "c1").send("update", {}, to="agg", tensors=big)
    got = fed.channel(backend, "agg").receive("update", timeout=30).tensors
    assert all(torch.equal(got[k], v) for k, v in big.items())


def test_message_without_tensors_has_empty_tensors(backend: Backend, fed: Federation) -> None:
    fed.channel(backend, "c1").send("hello", {"x": [1, 2]}, to="agg")
    msg = fed.channel(backend, "agg").receive("hello", timeout=10)
    assert msg.body == {"x": [1, 2]} and msg.tensors == {}


def test_broadcast_reaches_every_peer_and_stores_blob_once(
    backend: Backend, fed: Federation
) -> None:
    agg = fed.channel(backend, "agg")
    agg.send("weights", {"r": 1}, round=1, tensors={"w": torch.ones(3)})
    summary = inspect_task(backend.url, "task-1", backend.storage_options)
    assert summary.blobs == {"agg": 1}
    assert summary.pending == {("c1", "agg"): 1, ("c2", "agg"): 1}
    for node in ("c1", "c2"):
        msg = fed.channel(backend, node).receive("weights", sender="agg", round=1, timeout=10)
        assert torch.equal(msg.tensors["w"], torch.ones(3))
    assert fed.channel(backend, "agg").poll() == []  # the sender does not get its own broadcast


def test_traffic_counts_what_was_stored_and_read(backend: Backend, fed: Federation) -> None:
    agg, c1, c2 = (fed.channel(backend, n) for n in ("agg", "c1", "c2"))
    w = torch.ones(1000)  # 4,000 bytes of data; the blob adds a small safetensors header
    agg.send("weights", {"r": 1}, round=1, tensors={"w": w})  # to both clients, stored once
    sent = agg.traffic
    assert sent.messages_sent == 1 and sent.messages_received == 0
    assert 4000 < sent.bytes_sent < 4000 + 2 * 4096  # one blob, two small envelopes
    got = c1.receive("weights", timeout=10)
    assert torch.equal(got.tensors["w"], w)
    assert c1.traffic.messages_received == 1
    c2.receive("weights", timeout=10)
    # every byte the sender stored was read once by a recipient (each read the blob)
    assert c1.traffic.bytes_received + c2.traffic.bytes_received > sent.bytes_sent
    assert c1.traffic.bytes_received == c2.traffic.bytes_received
    before = c1.traffic.copy()
    c1.send("hello", {}, to="agg")
    assert c1.traffic.messages_sent == before.messages_sent + 1 and before.messages_sent == 0


def test_non_durable_messages_round_trip_and_polling_can_be_tightened(
    backend: Backend, fed: Federation
) -> None:
    agg, c1 = fed.channel(backend, "agg"), fed.channel(backend, "c1")
    c1.set_polling(0.0005, 0.002)
    assert (c1.poll_initial, c1.poll_max) == (0.0005, 0.002)
    with pytest.raises(ValueError, match="initial <= maximum"):
        c1.set_polling(0.01, 0.001)
    agg.send("gradient", {"s": 1}, to="c1", round=4, tensors={"g": torch.ones(2)}, durable=False)
    msg = c1.receive("gradient", round=4, timeout=10)
    assert msg.body == {"s": 1} and torch.equal(msg.tensors["g"], torch.ones(2))


def test_filters_leave_other_messages_pending(backend: Backend, fed: Federation) -> None:
    c1, c2, agg = (fed.channel(backend, n) for n in ("c1", "c2", "agg"))
    c1.send("update", {"i": 1}, to="agg", round=1)
    c1.send("metrics", {"i": 2}, to="agg", round=1)
    c2.send("update", {"i": 3}, to="agg", round=2)
    assert agg.receive("metrics", timeout=10).body == {"i": 2}
    assert agg.receive(sender="c2", timeout=10).body == {"i": 3}
    assert agg.poll("update", round=2) == []
    assert [m.body["i"] for m in agg.poll()] == [1]
    assert agg.poll() == []


def test_order_per_sender_is_preserved(backend: Backend, fed: Federation) -> None:
    c1, agg = fed.channel(backend, "c1"), fed.channel(backend, "agg")
    for i in range(25):
        c1.send("tick", {"i": i}, to="agg")
    got = [agg.receive("tick", sender="c1", timeout=10).body["i"] for _ in range(25)]
    assert got == list(range(25))


def test_receive_times_out_naming_what_and_whom(backend: Backend, fed: Federation) -> None:
    agg = fed.channel(backend, "agg", poll_max=0.05)
    start = time.monotonic()
    with pytest.raises(ChannelTimeoutError) as info:
        agg.receive("update", sender="c2", round=4, timeout=0.3)
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 5
    text = str(info.value)
    assert "update" in text and "round 4" in text and "c2" in text
    assert info.value.missing == ["c2"]


def test_gather_returns_one_per_sender_or_reports_missing(
    backend: Backend, fed: Federation
) -> None:
    c1, c2, agg = (fed.channel(backend, n) for n in ("c1", "c2", "agg"))
    c1.send("update", {"n": 1}, to="agg", round=5)
    c2.send("update", {"n": 2}, to="agg", round=5)
    got = agg.gather("update", ["c1", "c2"], round=5, timeout=10)
    assert {s: m.body["n"] for s, m in got.items()} == {"c1": 1, "c2": 2}
    c1.send("update", {"n": 1}, to="agg", round=6)
    with pytest.raises(ChannelTimeoutError) as info:
        agg.gather("update", ["c1", "c2"], round=6, timeout=0.3)
    assert info.value.missing == ["c2"]
    assert list(info.value.partial) == ["c1"]


def test_consume_false_keeps_envelope_until_ack(backend: Backend, fed: Federation) -> None:
    fed.channel(backend, "c1").send("update", {}, to="agg")
    agg = fed.channel(backend, "agg")
    msg = agg.receive(timeout=10, consume=False)
    assert inspect_task(backend.url, "task-1", backend.storage_options).pending
    assert agg.poll() == []  # delivered once only
    agg.ack(msg)
    assert not inspect_task(backend.url, "task-1", backend.storage_options).pending


def test_prune_sent_removes_blobs_once_all_recipients_consumed(
    backend: Backend, fed: Federation
) -> None:
    agg = fed.channel(backend, "agg")
    agg.send("weights", {}, round=1, tensors={"w": torch.zeros(4)})
    fed.channel(backend, "c1").receive("weights", timeout=10)
    assert agg.prune_sent() == 0  # c2 has not read it yet
    fed.channel(backend, "c2").receive("weights", timeout=10)
    assert agg.prune_sent() == 1
    assert not inspect_task(backend.url, "task-1", backend.storage_options).blobs


def test_destroy_task_and_remove_task(backend: Backend, fed: Federation) -> None:
    agg = fed.channel(backend, "agg")
    agg.send("weights", {}, tensors={"w": torch.zeros(4)})
    agg.destroy_task()
    summary = inspect_task(backend.url, "task-1", backend.storage_options)
    assert not (summary.pending or summary.blobs or summary.other)
    agg.send("weights", {}, tensors={"w": torch.zeros(4)})
    remove_task(backend.url, "task-1", backend.storage_options)
    assert fed.channel(backend, "c1").poll() == []


def test_tasks_sharing_a_url_are_isolated(backend: Backend) -> None:
    one, two = Federation.make("a", "b", task_id="one"), Federation.make("a", "b", task_id="two")
    one.channel(backend, "a").send("x", {"task": 1}, to="b")
    two.channel(backend, "a").send("x", {"task": 2}, to="b")
    assert [m.body for m in two.channel(backend, "b").poll()] == [{"task": 2}]
    assert [m.body for m in one.channel(backend, "b").poll()] == [{"task": 1}]


def test_listing_cache_is_never_trusted(backend: Backend, fed: Federation) -> None:
    agg, c1 = fed.channel(backend, "agg"), fed.channel(backend, "c1")
    c1.send("first", {}, to="agg")
    assert agg.poll("other") == []  # "first" is now pending and its folders exist
    # Warm the receiver's fsspec listing cache for every level of its inbox...
    fs = agg.store.fs
    for rel in ("task-1/inbox", "task-1/inbox/agg", "task-1/inbox/agg/c1"):
        fs.ls(agg.store.path(rel), detail=False)
    # ...then a new message arrives from another process's point of view.
    c1.send("second", {}, to="agg")
    assert agg.receive("second", timeout=10).sender == "c1"
    assert agg.receive("first", timeout=10).sender == "c1"


def test_bad_arguments_fail_clearly(backend: Backend, fed: Federation) -> None:
    c1 = fed.channel(backend, "c1")
    with pytest.raises(ChannelError, match="unknown recipient 'nobody'"):
        c1.send("x", {}, to="nobody")
    with pytest.raises(InvalidNameError, match="message kind"):
        c1.send("../x", {}, to="agg")
    with pytest.raises(TypeError, match="JSON"):
        c1.send("x", {"t": torch.ones(1)}, to="agg")
    with pytest.raises(TypeError, match="JSON"):
        c1.send("x", {"v": float("nan")}, to="agg")
    with pytest.raises(MessageTooLargeError):
        c1.send("x", {"s": "a" * MAX_BODY_BYTES}, to="agg")
    with pytest.raises(TypeError, match=r"not a torch\.Tensor"):
        c1.send("x", {}, to="agg", tensors={"w": [1.0]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="deadline"):
        c1.receive(timeout=0)
    with pytest.raises(ValueError, match="deadline"):
        c1.receive(timeout=float("inf"))
    assert c1.poll() == [] and fed.channel(backend, "agg").poll() == []  # nothing was sent


def test_polling_interval_defaults_to_the_storage_kind(backend: Backend, fed: Federation) -> None:
    ch = fed.channel(backend, "agg")
    want = POLL_MAX_REMOTE if backend.name == "s3" else POLL_MAX_LOCAL
    assert ch.poll_max == want
    assert fed.channel(backend, "agg", poll_max=0.5).poll_max == 0.5
    # A first interval longer than the default cap raises the cap instead of failing.
    assert fed.channel(backend, "agg", poll_initial=0.3).poll_max == 0.3
