"""The signed envelope: one per message and recipient, stored as one JSON object.

An envelope names the task, sender, recipient, kind, round and sequence number,
carries the small JSON body and the SHA-256 of the tensor blob it references, and
an Ed25519 signature over the canonical JSON of all of that. These are pure
functions: encoding, decoding and checking never touch storage.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

from lightning_fed.channel.errors import ChannelError, InvalidNameError, MessageTooLargeError
from lightning_fed.channel.keys import NodeIdentity, TaskConfig
from lightning_fed.channel.names import validate_name

FORMAT_VERSION = 1
MAX_BODY_BYTES = 1 << 20  # "small JSON body": 1 MiB of canonical JSON
MAX_ENVELOPE_BYTES = 2 * MAX_BODY_BYTES


class EnvelopeRejected(ChannelError):
    """An envelope failed a check and must never be delivered (``reason`` says why)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class BlobRef:
    """Where a message's tensor blob lives (relative to the task root) and its digest."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Envelope:
    """The signed header of a message (everything but the tensors themselves)."""

    task_id: str
    sender: str
    recipient: str
    kind: str
    round: int
    seq: int
    sent_at: float
    body: dict[str, Any]
    blob: BlobRef | None = None

    def payload(self) -> dict[str, Any]:
        """The signed fields as a JSON-ready dict."""
        return {
            "v": FORMAT_VERSION,
            "task": self.task_id,
            "sender": self.sender,
            "recipient": self.recipient,
            "kind": self.kind,
            "round": self.round,
            "seq": self.seq,
            "sent_at": self.sent_at,
            "body": self.body,
            "blob": None
            if self.blob is None
            else {"path": self.blob.path, "sha256": self.blob.sha256, "size": self.blob.size},
        }


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no spaces, ASCII, no NaN/Infinity."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def check_body(body: Any) -> dict[str, Any]:
    """Validate a message body: a JSON object of at most :data:`MAX_BODY_BYTES`."""
    if not isinstance(body, dict):
        raise TypeError(f"message body must be a dict, got {type(body).__name__}")
    try:
        size = len(canonical_json(body))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"message body must be JSON-serialisable with no NaN/Infinity: {exc}; "
            "hint: send tensors as `tensors=`, not in the body"
        ) from exc
    if json.loads(canonical_json(body)) != body:
        raise TypeError(
            "message body must survive a JSON round trip unchanged (string keys; lists, not "
            "tuples); hint: convert it before sending"
        )
    if size > MAX_BODY_BYTES:
        raise MessageTooLargeError(
            f"message body is {size} bytes of JSON, over the {MAX_BODY_BYTES}-byte limit; "
            "hint: send bulky numeric data as `tensors=`"
        )
    return body


def seal(envelope: Envelope, identity: NodeIdentity) -> bytes:
    """Sign ``envelope`` with ``identity`` and return the bytes to store."""
    if identity.node_id != envelope.sender:
        raise ValueError(
            f"identity {identity.node_id!r} cannot sign for sender {envelope.sender!r}"
        )
    payload = envelope.payload()
    signature = identity.sign(canonical_json(payload))
    return canonical_json({"payload": payload, "sig": base64.b64encode(signature).decode()})


def _field(payload: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = payload.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise EnvelopeRejected(f"field {name!r} is missing or has the wrong type")
    return value


def _parse_blob(raw: Any) -> BlobRef | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise EnvelopeRejected("field 'blob' is not an object")
    path, sha, size = raw.get("path"), raw.get("sha256"), raw.get("size")
    if not (isinstance(path, str) and isinstance(sha, str) and isinstance(size, int)):
        raise EnvelopeRejected("field 'blob' lacks path, sha256 or size")
    parts = path.split("/")
    try:
        for part in parts:
            validate_name(part, "blob path part")
    except InvalidNameError as exc:
        raise EnvelopeRejected(f"blob path {path!r} is unsafe") from exc
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha) or size < 0:
        raise EnvelopeRejected("blob digest or size is malformed")
    return BlobRef(path, sha, size)


def open_envelope(data: bytes, task: TaskConfig) -> Envelope:
    """Parse stored bytes and verify the signature against the task's keys.

    Raises:
        EnvelopeRejected: with the reason (malformed, unknown sender, bad signature,
            wrong task), so that the caller can log it and never deliver.
    """
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeRejected(f"envelope is {len(data)} bytes, over the limit")
    try:
        outer = json.loads(data)
        payload = outer["payload"]
        signature = base64.b64decode(outer["sig"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as exc:
        raise EnvelopeRejected(f"malformed envelope ({type(exc).__name__})") from None
    if not isinstance(payload, dict):
        raise EnvelopeRejected("malformed envelope (payload is not an object)")
    sender = payload.get("sender")
    if not isinstance(sender, str) or sender not in task.nodes:
        raise EnvelopeRejected(f"unknown sender {sender!r}: not in task {task.task_id!r}")
    try:
        signed = canonical_json(payload)
    except (ValueError, TypeError, RecursionError) as exc:
        raise EnvelopeRejected("payload is not canonical JSON") from exc
    if not task.verify(sender, signature, signed):
        raise EnvelopeRejected(f"bad signature: forged or tampered message claiming {sender!r}")
    if payload.get("v") != FORMAT_VERSION:
        raise EnvelopeRejected(f"unsupported envelope version {payload.get('v')!r}")
    task_id = _field(payload, "task", str)
    if task_id != task.task_id:
        raise EnvelopeRejected(f"wrong task {task_id!r}, expected {task.task_id!r}")
    sent_at = _field(payload, "sent_at", (int, float))
    if not math.isfinite(sent_at):
        raise EnvelopeRejected("field 'sent_at' is not finite")
    return Envelope(
        task_id=task_id,
        sender=sender,
        recipient=_field(payload, "recipient", str),
        kind=_field(payload, "kind", str),
        round=_field(payload, "round", int),
        seq=_field(payload, "seq", int),
        sent_at=float(sent_at),
        body=_field(payload, "body", dict),
        blob=_parse_blob(payload.get("blob")),
    )
