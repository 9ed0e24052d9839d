"""Authenticity and integrity: forged, tampered, replayed, wrong-task, unknown-sender and
misaddressed envelopes are rejected with a logged reason; damaged blobs raise a clear error."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch

from lightning_fed.channel import BlobIntegrityError, NodeIdentity
from lightning_fed.channel.envelope import MAX_ENVELOPE_BYTES, BlobRef, Envelope, seal
from lightning_fed.channel.tensors import sha256_hex
from tests.channel.helpers import Federation
from tests.conftest import Backend


@pytest.fixture
def fed() -> Federation:
    return Federation.make("agg", "c1", "c2")


def _key(recipient: str, sender: str, seq: int, kind: str) -> str:
    return f"task-1/inbox/{recipient}/{sender}/{seq:020d}-{kind}.msg"


def _envelope(sender: str, seq: int, **changes: object) -> Envelope:
    fields: dict[str, object] = dict(
        task_id="task-1",
        sender=sender,
        recipient="agg",
        kind="update",
        round=1,
        seq=seq,
        sent_at=time.time(),
        body={"n": 1},
        blob=None,
    )
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]


def _assert_rejected(agg_channel: object, caplog: pytest.LogCaptureFixture, reason: str) -> None:
    from lightning_fed.channel import Channel

    assert isinstance(agg_channel, Channel)
    with caplog.at_level(logging.WARNING, logger="lightning_fed.channel.channel"):
        assert agg_channel.poll() == []
    assert any(reason in r.reason for r in agg_channel.rejections), agg_channel.rejections
    assert any(reason in rec.getMessage() for rec in caplog.records)


def _deliver_one_good(fed: Federation, backend: Backend, agg: object) -> None:
    """After any rejection the channel keeps delivering authentic messages."""
    fed.channel(backend, "c2").send("update", {"ok": True}, to="agg", round=1)
    assert agg.receive("update", sender="c2", timeout=10).body == {"ok": True}  # type: ignore[attr-defined]


def test_forged_signature_is_rejected(
    backend: Backend, fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    agg = fed.channel(backend, "agg")
    mallory = NodeIdentity("c1", NodeIdentity.generate("x").private_key)  # claims to be c1
    seq = 1_000
    agg.store.publish(_key("agg", "c1", seq, "update"), seal(_envelope("c1", seq), mallory))
    _assert_rejected(agg, caplog, "bad signature")
    _deliver_one_good(fed, backend, agg)


def test_tampered_envelope_is_rejected(
    backend: Backend, fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    agg, c1 = fed.channel(backend, "agg"), fed.channel(backend, "c1")
    seq = c1.send("update", {"n": 10}, to="agg", round=1)
    key = _key("agg", "c1", seq, "update")
    stored = json.loads(agg.store.read(key))
    stored["payload"]["body"]["n"] = 10_000  # inflate the sample count
    agg.store.publish(key, json.dumps(stored).encode())
    _assert_rejected(agg, caplog, "bad signature")
    _deliver_one_good(fed, backend, agg)


def test_replayed_envelope_is_rejected(
    backend: Backend, fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    agg, c1 = fed.channel(backend, "agg"), fed.channel(backend, "c1")
    seq = c1.send("update", {"n": 1}, to="agg", round=1)
    key = _key("agg", "c1", seq, "update")
    original = agg.store.read(key)
    assert agg.receive("update", timeout=10).seq == seq  # consumed: envelope deleted
    agg.store.publish(key, original)  # the storage operator puts it back
    _assert_rejected(agg, caplog, "replayed")
    _deliver_one_good(fed, backend, agg)


def test_wrong_task_is_rejected(
    backend: Backend, fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    agg = fed.channel(backend, "agg")
    env = _envelope("c1", 2_000, task_id="another-task")
    agg.store.publish(_key("agg", "c1", 2_000, "update"), seal(env, fed.identities["c1"]))
    _assert_rejected(agg, caplog, "wrong task")
    _deliver_one_good(fed, backend, agg)


def test_unknown_sender_is_rejected(
    backend: Backend, fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    agg = fed.channel(backend, "agg")
    mallory = NodeIdentity.generate("mallory")
    agg.store.publish(
        _key("agg", "mallory", 3_000, "update"), seal(_envelope("mallory", 3_000), mallory)
    )
    _assert_rejected(agg, caplog, "unknown sender 'mallory'")
    _deliver_one_good(fed, backend, agg)


def test_misaddressed_envelope_is_rejected(
    backend: Backend, fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    agg, c1 = fed.channel(backend, "agg"), fed.channel(backend, "c1")
    seq = c1.send("update", {"for": "c2"}, to="c2", round=1)
    data = agg.store.read(_key("c2", "c1", seq, "update"))
    agg.store.publish(_key("agg", "c1", seq, "update"), data)  # copied into agg's inbox
    _assert_rejected(agg, caplog, "addressed to 'c2'")
    _deliver_one_good(fed, backend, agg)


def test_renamed_envelope_is_rejected(
    backend: Backend, fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    agg, c1 = fed.channel(backend, "agg"), fed.channel(backend, "c1")
    seq = c1.send("metrics", {}, to="agg", round=1)
    key = _key("agg", "c1", seq, "metrics")
    data = agg.store.read(key)
    agg.store.delete(key)
    agg.store.publish(_key("agg", "c1", seq, "update"), data)  # the kind in the name lies
    _assert_rejected(agg, caplog, "does not match its signed header")


def test_garbage_envelope_is_rejected(
    backend: Backend, fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    agg = fed.channel(backend, "agg")
    agg.store.publish(_key("agg", "c1", 5, "update"), b"\x00not json")
    _assert_rejected(agg, caplog, "malformed envelope")
    _deliver_one_good(fed, backend, agg)


def test_blob_of_another_sender_is_rejected(
    backend: Backend, fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    agg = fed.channel(backend, "agg")
    ref = BlobRef("blobs/c2/00000000000000000001.safetensors", "0" * 64, 10)
    env = _envelope("c1", 6_000, blob=ref)
    agg.store.publish(_key("agg", "c1", 6_000, "update"), seal(env, fed.identities["c1"]))
    _assert_rejected(agg, caplog, "did not store")


# -- tensor blobs --------------------------------------------------------------------


def _send_with_blob(fed: Federation, backend: Backend) -> tuple[object, str]:
    c1 = fed.channel(backend, "c1")
    seq = c1.send("update", {}, to="agg", round=2, tensors={"w": torch.randn(64)})
    return fed.channel(backend, "agg"), f"task-1/blobs/c1/{seq:020d}.safetensors"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", "truncated"),
        ("corrupt", "SHA-256"),
        ("delete", "missing"),
    ],
)
def test_damaged_blob_raises_naming_sender_and_message(
    backend: Backend, fed: Federation, damage: str, reason: str
) -> None:
    agg, blob_key = _send_with_blob(fed, backend)
    store = agg.store  # type: ignore[attr-defined]
    data = store.read(blob_key)
    if damage == "truncate":
        store.publish(blob_key, data[: len(data) // 2])
    elif damage == "corrupt":
        store.publish(blob_key, data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        store.delete(blob_key)
    with pytest.raises(BlobIntegrityError, match=reason) as info:
        agg.receive("update", timeout=10)  # type: ignore[attr-defined]
    err = info.value
    assert (err.sender, err.kind, err.round) == ("c1", "update", 2)
    assert "'c1'" in str(err) and "'update'" in str(err)


def test_authentic_but_undecodable_blob_raises(backend: Backend, fed: Federation) -> None:
    agg = fed.channel(backend, "agg")
    junk = b"\xff" * 100
    path = "blobs/c1/00000000000000007000.safetensors"
    agg.store.publish(f"task-1/{path}", junk)
    env = _envelope("c1", 7_000, blob=BlobRef(path, sha256_hex(junk), len(junk)))
    agg.store.publish(_key("agg", "c1", 7_000, "update"), seal(env, fed.identities["c1"]))
    with pytest.raises(BlobIntegrityError, match="not a valid safetensors blob"):
        agg.receive("update", timeout=10)


def test_poll_keeps_every_intact_message_when_a_blob_is_damaged(
    backend: Backend, fed: Federation
) -> None:
    c1, agg = fed.channel(backend, "c1"), fed.channel(backend, "agg")
    seqs = [
        c1.send("update", {"i": i}, to="agg", tensors={"w": torch.ones(3) * i}) for i in range(3)
    ]
    agg.store.delete(f"task-1/blobs/c1/{seqs[1]:020d}.safetensors")
    with pytest.raises(BlobIntegrityError, match="missing"):
        agg.poll("update")
    # The intact messages before and after the damaged one were not consumed.
    assert [m.body["i"] for m in agg.poll("update")] == [0, 2]
    assert any("missing" in r.reason for r in agg.rejections)


def test_gather_keeps_every_intact_message_when_a_blob_is_damaged(
    backend: Backend, fed: Federation
) -> None:
    fed = Federation.make("agg", "c1", "c2", "c3")
    agg = fed.channel(backend, "agg")
    fed.channel(backend, "c1").send("update", {}, to="agg", round=1, tensors={"w": torch.zeros(3)})
    assert agg.poll("nothing") == []  # c1's envelope is now pending: taken in a first pass
    seq = fed.channel(backend, "c2").send(
        "update", {}, to="agg", round=1, tensors={"w": torch.ones(3)}
    )
    fed.channel(backend, "c3").send("update", {}, to="agg", round=1, tensors={"w": torch.ones(3)})
    agg.store.delete(f"task-1/blobs/c2/{seq:020d}.safetensors")
    with pytest.raises(BlobIntegrityError):
        agg.gather("update", ["c1", "c2", "c3"], round=1, timeout=10)
    assert sorted(m.sender for m in agg.poll("update")) == ["c1", "c3"]


def test_oversized_blob_is_refused_before_allocating(backend: Backend, fed: Federation) -> None:
    agg = fed.channel(backend, "agg")
    huge = BlobRef("blobs/c1/00000000000000008000.safetensors", "0" * 64, 1 << 62)
    env = _envelope("c1", 8_000, blob=huge)
    agg.store.publish(_key("agg", "c1", 8_000, "update"), seal(env, fed.identities["c1"]))
    with pytest.raises(BlobIntegrityError, match="max_blob_bytes="):
        agg.receive("update", timeout=10)


def test_deeply_nested_envelope_is_rejected_not_raised(
    backend: Backend, fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    agg = fed.channel(backend, "agg")
    agg.store.publish(_key("agg", "c1", 9, "update"), b"[" * 200_000 + b"]" * 200_000)
    _assert_rejected(agg, caplog, "malformed envelope")
    _deliver_one_good(fed, backend, agg)


def test_oversized_envelope_is_rejected_unread(
    backend: Backend, fed: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    agg = fed.channel(backend, "agg")
    agg.store.publish(_key("agg", "c1", 10, "update"), b" " * (MAX_ENVELOPE_BYTES + 1))
    _assert_rejected(agg, caplog, "unreadable envelope")


def test_replay_after_a_receiver_restart_is_rejected_with_a_state_dir(
    backend: Backend, fed: Federation, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    agg = fed.channel(backend, "agg", state_dir=tmp_path / "state")
    seq = fed.channel(backend, "c1").send("update", {"n": 1}, to="agg", round=1)
    key = _key("agg", "c1", seq, "update")
    original = agg.store.read(key)
    assert agg.receive("update", timeout=10).seq == seq
    restarted = fed.channel(backend, "agg", state_dir=tmp_path / "state")
    restarted.store.publish(key, original)  # the storage operator puts it back
    _assert_rejected(restarted, caplog, "consumed before")


def test_messages_left_unconsumed_before_a_restart_are_still_delivered(
    backend: Backend, fed: Federation, tmp_path: Path
) -> None:
    agg = fed.channel(backend, "agg", state_dir=tmp_path / "state")
    c1 = fed.channel(backend, "c1")
    c1.send("update", {"i": 0}, to="agg")
    c1.send("update", {"i": 1}, to="agg")
    assert agg.receive("update", timeout=10).body == {"i": 0}
    restarted = fed.channel(backend, "agg", state_dir=tmp_path / "state")
    assert [m.body for m in restarted.poll()] == [{"i": 1}]
