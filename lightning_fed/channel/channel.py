"""The channel: signed messages and named tensors between the nodes of one task.

Storage layout under ``<url>/<task_id>/`` (see docs/channel.md)::

    inbox/<recipient>/<sender>/<seq>-<kind>.msg    one signed envelope per recipient
    blobs/<sender>/<seq>.safetensors              the message's tensors, stored once

A sender publishes the blob first and the envelopes last, each atomically, so a
reader that sees an envelope can always read the whole blob. Receivers list
their inbox afresh on every poll, verify each new envelope (signature, task,
recipient, sequence number) and deliver only what passes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning_fed.channel.envelope import (
    MAX_ENVELOPE_BYTES,
    BlobRef,
    Envelope,
    EnvelopeRejected,
    check_body,
    open_envelope,
    seal,
)
from lightning_fed.channel.errors import BlobIntegrityError, ChannelError, ChannelTimeoutError
from lightning_fed.channel.journal import ConsumedJournal
from lightning_fed.channel.keys import NodeIdentity, TaskConfig
from lightning_fed.channel.names import validate_name
from lightning_fed.channel.polling import Backoff
from lightning_fed.channel.store import Store
from lightning_fed.channel.tensors import (
    StreamingHash,
    allocate_buffer,
    decode_tensors,
    encode_tensors,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ENVELOPE_SUFFIX = ".msg"
BLOB_SUFFIX = ".safetensors"
SEQ_DIGITS = 20
#: Default longest polling interval on a local folder or ``memory://``, in seconds.
POLL_MAX_LOCAL = 0.02
#: Default longest polling interval on object stores and remote file systems, in seconds.
POLL_MAX_REMOTE = 0.2

Selector = str | Collection[str] | None


@dataclass
class Traffic:
    """What a channel has moved so far: sealed envelopes and tensor blobs, in bytes.

    A blob sent to several recipients is stored, and counted, once.
    """

    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0

    def copy(self) -> Traffic:
        """A snapshot, for differences over a span of work."""
        return Traffic(**vars(self))


@dataclass(frozen=True)
class Message:
    """A delivered message: authentic, for this node, with verified tensors."""

    sender: str
    recipient: str
    kind: str
    round: int
    seq: int
    sent_at: float
    body: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    key: str = field(repr=False, compare=False)


@dataclass(frozen=True)
class Rejection:
    """A stored object that was refused, and why (also logged at WARNING)."""

    key: str
    reason: str


def _as_set(selector: Selector) -> set[str] | None:
    if selector is None:
        return None
    if isinstance(selector, str):
        return {selector}
    return set(selector)


def _describe(kind: Selector, round: int | None) -> str:
    kinds = _as_set(kind)
    what = "any message" if kinds is None else "message " + "/".join(sorted(kinds))
    return what if round is None else f"{what} of round {round}"


class Channel:
    """Messages and tensors between the nodes of one task, over one fsspec URL.

    The constructor only records its arguments; :meth:`connect` (or ``with``)
    opens the storage. A channel object is not thread-safe.

    Args:
        url: where the task's storage lives: a local path, ``file://``, ``s3://``,
            ``gs://``, ``az://``, ``sftp://`` or ``memory://`` URL.
        task: the task configuration (task id and every node's public key).
        identity: this node's id and private key.
        storage_options: fsspec options (credentials, ``endpoint_url``...).
        timeout: default deadline of a receive, in seconds.
        poll_initial: first polling interval in seconds while waiting.
        poll_max: longest polling interval in seconds; None picks
            :data:`POLL_MAX_LOCAL` for a local folder (listing it costs microseconds)
            and :data:`POLL_MAX_REMOTE` for object stores and remote file systems
            (each listing is a billed request).
        max_blob_bytes: the largest tensor blob this node accepts from a peer.
        state_dir: a local folder for this node's journal of consumed messages; with
            it, replays are refused across restarts too (see :mod:`.journal`).
    """

    def __init__(
        self,
        url: str,
        task: TaskConfig,
        identity: NodeIdentity,
        *,
        storage_options: Mapping[str, Any] | None = None,
        timeout: float = 300.0,
        poll_initial: float = 0.002,
        poll_max: float | None = None,
        max_blob_bytes: int = 32 << 30,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if identity.node_id not in task.nodes:
            raise ChannelError(
                f"node {identity.node_id!r} is not part of task {task.task_id!r} "
                f"(nodes: {', '.join(task.node_ids)}); hint: add its public key to the task "
                "configuration"
            )
        if task.nodes[identity.node_id] != identity.public_key_text:
            raise ChannelError(
                f"the private key of node {identity.node_id!r} does not match its public key "
                f"in task {task.task_id!r}; hint: use the key pair made for this node"
            )
        Backoff(poll_initial, max(poll_initial, POLL_MAX_LOCAL) if poll_max is None else poll_max)
        self._check_timeout(timeout)
        self.url = url
        self.task = task
        self.identity = identity
        self.storage_options = dict(storage_options or {})
        self.timeout = timeout
        self.poll_initial = poll_initial
        self._poll_max = poll_max
        self.max_blob_bytes = max_blob_bytes
        self.rejections: list[Rejection] = []
        self.traffic = Traffic()
        self._store: Store | None = None
        self._seq = 0
        self._last_seq: dict[str, int] = {}
        self._pending: dict[str, list[tuple[Envelope, str]]] = {}
        self._known: set[str] = set()
        self._sent: dict[int, tuple[str | None, list[str]]] = {}
        self._journal = (
            None
            if state_dir is None
            else ConsumedJournal(state_dir, task.task_id, identity.node_id)
        )

    # -- lifecycle ---------------------------------------------------------------
    def connect(self) -> Channel:
        """Open the storage (idempotent) and return ``self``."""
        if self._store is None:
            store = Store(self.url, self.storage_options)
            store.check()
            if self._journal is not None:
                self._journal.load()
            self._store = store
        return self

    def close(self) -> None:
        """Forget the storage handle; pending undelivered messages stay stored."""
        self._store = None

    def __enter__(self) -> Channel:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def store(self) -> Store:
        """The opened storage; raises if :meth:`connect` was not called."""
        if self._store is None:
            raise ChannelError("channel is not connected; hint: call connect() or use `with`")
        return self._store

    def set_polling(self, initial: float, maximum: float | None = None) -> None:
        """Change the polling intervals of later waits (see the constructor's arguments)."""
        Backoff(initial, max(initial, POLL_MAX_LOCAL) if maximum is None else maximum)
        self.poll_initial, self._poll_max = initial, maximum

    @property
    def poll_max(self) -> float:
        """The longest polling interval in seconds (the default depends on the storage)."""
        if self._poll_max is not None:
            return self._poll_max
        local = self._store is not None and (self._store.local or "memory" in self._store.protocols)
        return max(self.poll_initial, POLL_MAX_LOCAL if local else POLL_MAX_REMOTE)

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self.identity.node_id

    @property
    def peers(self) -> list[str]:
        """Every other node of the task, sorted."""
        return [n for n in self.task.node_ids if n != self.node_id]

    # -- sending -----------------------------------------------------------------
    def _next_seq(self) -> int:
        # Microseconds since the epoch, strictly increasing: stays monotonic across
        # restarts of the sender, so receivers that outlive it accept its new messages.
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return self._seq

    def _recipients(self, to: Selector) -> list[str]:
        if to is None:
            if not self.peers:
                raise ChannelError(
                    f"task {self.task.task_id!r} has no node besides {self.node_id!r}, so a "
                    "message to every peer would reach nobody; hint: add the peers' public keys"
                )
            return self.peers
        names = [to] if isinstance(to, str) else list(to)
        for name in names:
            validate_name(name, "recipient node id")
            if name not in self.task.nodes:
                raise ChannelError(
                    f"unknown recipient {name!r}: not a node of task {self.task.task_id!r} "
                    f"(nodes: {', '.join(self.task.node_ids)})"
                )
        return sorted(set(names))

    def send(
        self,
        kind: str,
        body: dict[str, Any] | None = None,
        *,
        to: Selector = None,
        round: int = 0,
        tensors: Mapping[str, torch.Tensor] | None = None,
        durable: bool = True,
    ) -> int:
        """Publish a message to ``to`` (a node id, several, or None for every peer).

        Args:
            kind: what the message is (a safe name such as ``"weights"``).
            body: a small JSON object (at most 1 MiB of JSON).
            to: recipient node id(s); None sends to every other node of the task.
            round: an integer the receiver can filter on.
            tensors: named tensors, sent as one safetensors blob stored once.
            durable: on a local folder, fsync the message before returning (the
                default). False saves about a millisecond per message, and a machine
                crash may lose it: for per-batch messages that a restart regenerates.

        Returns:
            The message's sequence number.
        """
        validate_name(kind, "message kind")
        if not isinstance(round, int) or isinstance(round, bool):
            raise TypeError(f"round must be an int, got {round!r}")
        body = check_body({} if body is None else body)
        recipients = self._recipients(to)
        store = self.store
        seq = self._next_seq()
        blob: BlobRef | None = None
        if tensors is not None:
            encoded = encode_tensors(tensors)
            path = f"blobs/{self.node_id}/{seq:0{SEQ_DIGITS}d}{BLOB_SUFFIX}"
            with StreamingHash() as digest:
                digest.feed_all(encoded.chunks)  # hashed on another core while written
                store.publish(self._task_key(path), encoded.chunks, durable=durable)
                blob = BlobRef(path, digest.hexdigest(), encoded.size)
            self.traffic.bytes_sent += encoded.size
        keys = []
        sent_at = time.time()
        for recipient in recipients:
            env = Envelope(
                task_id=self.task.task_id,
                sender=self.node_id,
                recipient=recipient,
                kind=kind,
                round=round,
                seq=seq,
                sent_at=sent_at,
                body=body,
                blob=blob,
            )
            key = self._envelope_key(recipient, self.node_id, seq, kind)
            sealed = seal(env, self.identity)
            store.publish(key, sealed, durable=durable)
            self.traffic.bytes_sent += len(sealed)
            keys.append(key)
        self.traffic.messages_sent += 1
        self._sent[seq] = (None if blob is None else self._task_key(blob.path), keys)
        return seq

    # -- receiving ---------------------------------------------------------------
    def poll(
        self,
        kind: Selector = None,
        *,
        sender: Selector = None,
        round: int | None = None,
        consume: bool = True,
    ) -> list[Message]:
        """Deliver every matching message available now, without waiting.

        Messages from one sender come in the order it sent them.
        """
        self._refresh()
        taken = []
        while (found := self._take(kind, sender, round)) is not None:
            taken.append(found)
        return self._deliver_all(taken, consume=consume)

    def receive(
        self,
        kind: Selector = None,
        *,
        sender: Selector = None,
        round: int | None = None,
        timeout: float | None = None,
        consume: bool = True,
    ) -> Message:
        """Wait for the next message matching ``kind``, ``sender`` and ``round``.

        Args:
            kind: a kind or kinds to accept (None: any).
            sender: a sender or senders to accept (None: any).
            round: the round to accept (None: any).
            timeout: seconds to wait (default: the channel's ``timeout``).
            consume: delete the stored envelope once delivered (else call :meth:`ack`).

        Raises:
            ChannelTimeoutError: nothing matching arrived before the deadline.
            BlobIntegrityError: the message's tensors are missing or corrupt.
        """
        timeout = self._check_timeout(self.timeout if timeout is None else timeout)
        backoff = Backoff(self.poll_initial, self.poll_max, deadline_in=timeout)
        while True:
            self._refresh()
            found = self._take(kind, sender, round)
            if found is not None:
                return self._deliver_all([found], consume=consume)[0]
            if not backoff.sleep():
                senders = _as_set(sender)
                raise ChannelTimeoutError(_describe(kind, round), senders or (), timeout)

    def gather(
        self,
        kind: Selector,
        senders: Iterable[str],
        *,
        round: int | None = None,
        timeout: float | None = None,
        consume: bool = True,
    ) -> dict[str, Message]:
        """Wait for one matching message from each of ``senders``.

        Raises:
            ChannelTimeoutError: when the deadline passes first; its ``missing`` names
                the senders still awaited and its ``partial`` holds what did arrive.
        """
        timeout = self._check_timeout(self.timeout if timeout is None else timeout)
        waiting = set(senders)
        got: dict[str, Message] = {}
        taken: list[tuple[Envelope, str]] = []
        backoff = Backoff(self.poll_initial, self.poll_max, deadline_in=timeout)
        while waiting:
            self._refresh()
            found = [(s, self._take(kind, s, round)) for s in sorted(waiting)]
            arrived = [(s, f) for s, f in found if f is not None]
            try:
                messages = self._deliver_all([f for _, f in arrived], consume=False)
            except BaseException:  # the failing batch restored itself; restore earlier ones
                self._restore(taken)
                raise
            taken.extend(f for _, f in arrived)
            for (s, _), msg in zip(arrived, messages):
                got[s] = msg
                waiting.discard(s)
            if arrived:
                backoff.reset()
            if waiting and not backoff.sleep():
                if consume:
                    self._consume(taken)
                raise ChannelTimeoutError(_describe(kind, round), waiting, timeout, dict(got))
        if consume:
            self._consume(taken)
        return got

    def ack(self, message: Message) -> None:
        """Delete a delivered message's stored envelope (after ``consume=False``)."""
        if self._journal is not None:
            self._journal.record([(message.sender, message.seq)])
        self.store.delete(message.key)
        self._known.discard(message.key)

    # -- cleanup -----------------------------------------------------------------
    def prune_sent(self) -> int:
        """Delete blobs of sent messages that every recipient has consumed.

        Returns:
            How many blobs were deleted.
        """
        store = self.store
        remaining = {
            k
            for r in {k.split("/")[2] for _, keys in self._sent.values() for k in keys}
            for k in store.list_keys(f"{self.task.task_id}/inbox/{r}/{self.node_id}")
        }
        removed = 0
        for seq, (blob_key, keys) in list(self._sent.items()):
            if not any(k in remaining for k in keys):
                if blob_key is not None:
                    store.delete(blob_key)
                    removed += 1
                del self._sent[seq]
        return removed

    def destroy_task(self) -> None:
        """Delete the task's whole storage: every message and blob of every node."""
        self.store.delete_tree(self.task.task_id)

    # -- internals ---------------------------------------------------------------
    @staticmethod
    def _check_timeout(timeout: float) -> float:
        if not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
            raise ValueError(
                f"timeout must be a finite number of seconds > 0, got {timeout!r}; "
                "every wait on the channel has a deadline"
            )
        return float(timeout)

    def _task_key(self, rel: str) -> str:
        return f"{self.task.task_id}/{rel}"

    def _envelope_key(self, recipient: str, sender: str, seq: int, kind: str) -> str:
        return self._task_key(
            f"inbox/{recipient}/{sender}/{seq:0{SEQ_DIGITS}d}-{kind}{ENVELOPE_SUFFIX}"
        )

    def _reject(self, key: str, reason: str) -> None:
        log.warning("channel %s: rejected %s: %s", self.node_id, key, reason)
        self.rejections.append(Rejection(key, reason))
        self._known.add(key)

    def _refresh(self) -> None:
        inbox = self._task_key(f"inbox/{self.node_id}")
        fresh = [k for k in self.store.list_keys(inbox) if k not in self._known]
        if fresh:
            # A directory read that overlaps a sender's renames may return its later
            # envelope without the earlier one. Every envelope published before one we
            # saw was complete before this second listing began, so it is in it.
            fresh = [k for k in self.store.list_keys(inbox) if k not in self._known]
        # Sorted keys put each sender's envelopes in sequence order.
        for key in fresh:
            self._admit(key, len(inbox) + 1)

    def _admit(self, key: str, cut: int) -> None:
        rel = key[cut:]
        parts = rel.split("/")
        if len(parts) != 2 or not parts[1].endswith(ENVELOPE_SUFFIX):
            self._reject(key, "not an envelope name")
            return
        dir_sender, name = parts
        try:
            data = self.store.read(key, limit=MAX_ENVELOPE_BYTES)
        except FileNotFoundError:
            return  # deleted between listing and reading (e.g. acked elsewhere)
        except ValueError as exc:
            self._reject(key, f"unreadable envelope: it {exc}")
            return
        try:
            env = open_envelope(data, self.task)
        except EnvelopeRejected as exc:
            self._reject(key, exc.reason)
            return
        expected = f"{env.seq:0{SEQ_DIGITS}d}-{env.kind}{ENVELOPE_SUFFIX}"
        if env.recipient != self.node_id:
            self._reject(key, f"addressed to {env.recipient!r}, not to this node")
        elif dir_sender != env.sender or name != expected:
            self._reject(key, "stored under a name that does not match its signed header")
        elif self._journal is not None and self._journal.seen(env.sender, env.seq):
            self._reject(
                key, f"replayed sequence number {env.seq} from {env.sender!r} (consumed before)"
            )
        elif env.seq <= self._last_seq.get(env.sender, -1):
            self._reject(
                key,
                f"replayed or out-of-order sequence number {env.seq} from {env.sender!r} "
                f"(last accepted {self._last_seq[env.sender]})",
            )
        elif env.blob is not None and not env.blob.path.startswith(f"blobs/{env.sender}/"):
            self._reject(key, "references a blob that its sender did not store")
        else:
            self._last_seq[env.sender] = env.seq
            self.traffic.messages_received += 1
            self.traffic.bytes_received += len(data)
            self._pending.setdefault(env.sender, []).append((env, key))
            self._known.add(key)

    def _take(
        self, kind: Selector, sender: Selector, round: int | None
    ) -> tuple[Envelope, str] | None:
        kinds, senders = _as_set(kind), _as_set(sender)
        best: tuple[str, int] | None = None
        for s, queue in self._pending.items():
            if senders is not None and s not in senders:
                continue
            for i, (env, _key) in enumerate(queue):
                if (kinds is None or env.kind in kinds) and (round is None or env.round == round):
                    if best is None or env.seq < self._pending[best[0]][best[1]][0].seq:
                        best = (s, i)
                    break
        if best is None:
            return None
        return self._pending[best[0]].pop(best[1])

    def _deliver_all(self, taken: list[tuple[Envelope, str]], *, consume: bool) -> list[Message]:
        """Turn taken envelopes into messages; all or nothing.

        If one message's blob is unusable, that message is recorded as rejected (it stays
        stored, for inspection), every other taken message goes back to the pending
        queues untouched, and the error is raised. If the storage fails, all go back.
        """
        out = []
        for i, (env, key) in enumerate(taken):
            try:
                tensors = {} if env.blob is None else self._load_blob(env)
            except BlobIntegrityError as exc:
                self._restore(taken[:i] + taken[i + 1 :])
                self._reject(key, exc.reason)
                raise
            except BaseException:
                self._restore(taken)
                raise
            out.append(
                Message(
                    sender=env.sender,
                    recipient=env.recipient,
                    kind=env.kind,
                    round=env.round,
                    seq=env.seq,
                    sent_at=env.sent_at,
                    body=env.body,
                    tensors=tensors,
                    key=key,
                )
            )
        if consume:
            self._consume(taken)
        return out

    def _restore(self, taken: list[tuple[Envelope, str]]) -> None:
        for env, key in taken:
            queue = self._pending.setdefault(env.sender, [])
            queue.append((env, key))
            queue.sort(key=lambda item: item[0].seq)

    def _consume(self, taken: Iterable[tuple[Envelope, str]]) -> None:
        """Delete delivered envelopes; a failed delete is logged, never loses a message."""
        taken = list(taken)
        if self._journal is not None:
            self._journal.record((env.sender, env.seq) for env, _ in taken)
        for _, key in taken:
            try:
                self.store.delete(key)
            except ChannelError as exc:
                log.warning("channel %s: could not delete consumed %s: %s", self.node_id, key, exc)
                continue  # stays known, so it is not delivered again by this channel
            self._known.discard(key)

    def _load_blob(self, env: Envelope) -> dict[str, torch.Tensor]:
        assert env.blob is not None
        ref = env.blob

        def fail(reason: str) -> BlobIntegrityError:
            return BlobIntegrityError(env.sender, env.kind, env.seq, env.round, reason)

        if ref.size > self.max_blob_bytes:
            raise fail(
                f"blob {ref.path!r} declares {ref.size} bytes, over this channel's "
                f"max_blob_bytes={self.max_blob_bytes}; hint: raise max_blob_bytes if the "
                "sender is trusted to send models this large"
            )
        try:
            buffer = allocate_buffer(ref.size)
        except (OSError, OverflowError, MemoryError) as exc:
            raise fail(f"cannot allocate {ref.size} bytes for blob {ref.path!r}: {exc}") from exc
        with StreamingHash() as digest:
            try:
                for chunk in self.store.read_into(self._task_key(ref.path), buffer):
                    digest.feed(chunk)  # hashed on another core while the next is read
            except FileNotFoundError:
                raise fail(f"blob {ref.path!r} is missing") from None
            except ValueError as exc:
                raise fail(f"blob {ref.path!r} {exc} (truncated or replaced)") from None
            if digest.hexdigest() != ref.sha256:
                raise fail(f"blob {ref.path!r} does not match its SHA-256 (corrupted)")
        self.traffic.bytes_received += ref.size
        try:
            return decode_tensors(buffer)
        except Exception as exc:  # any malformed header of a signed blob is the sender's fault
            raise fail(str(exc)) from exc
