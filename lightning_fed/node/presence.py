"""One live process per node id: a signed, heartbeating claim in the shared storage.

A party claims its node id when it connects: it stores a small signed record under
``<task_id>/presence/<node_id>/<instance>.json`` and rewrites it every
:data:`HEARTBEAT` seconds from a background thread. A second process of the same node
id finds the claim and decides whether its owner still lives:

- on the same machine (host name, boot and PID namespace alike): whether its PID
  still runs, at once;
- elsewhere: whether its heartbeat advances within :data:`STALE_AFTER` seconds.

A live owner is named (instance, host, PID, when it was last seen) and the second
process stops before it writes anything (:class:`NodeBusyError`). A dead owner's
claim is removed and the new process goes on: a restart after a crash works.

Claims are signed with the node's key and checked against the task configuration,
so one party cannot lock another out; the storage operator can always deny service.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from lightning_fed.channel import Channel, ChannelError, Store, TaskConfig
from lightning_fed.channel.envelope import canonical_json
from lightning_fed.errors import LightningFedError

log = logging.getLogger(__name__)

#: Seconds between two heartbeats of a claim.
HEARTBEAT = 2.0
#: Seconds without a heartbeat after which a claim from another machine is stale.
STALE_AFTER = 12.0
#: Seconds between two looks at a rival claim's heartbeat.
_LOOK_EVERY = 0.5
#: Seconds between the two listings of claims at start (covers a publish under way).
_SETTLE = 0.5


class NodeBusyError(LightningFedError):
    """Another live process already runs this node id; this one must not start."""


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def machine_id() -> str:
    """Host name, boot id and PID namespace: equal only for processes that see each other's PIDs."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = "?"
    return f"{socket.gethostname()}/{_read_text('/proc/sys/kernel/random/boot_id')}/{namespace}"


def pid_runs(pid: int) -> bool:
    """Whether a process with this PID runs on this machine (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    state = _read_text(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()[:1]
    return state != ["Z"]


@dataclass(frozen=True)
class Claim:
    """One process's claim of a node id."""

    task_id: str
    node_id: str
    instance: str
    host: str
    machine: str
    pid: int
    started_at: float
    seen_at: float
    beat: int

    def describe(self) -> str:
        ago = max(0.0, time.time() - self.seen_at)
        return (
            f"instance {self.instance} (pid {self.pid} on host {self.host}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started_at))}, last seen "
            f"{ago:.1f} s ago)"
        )


def claim_key(task_id: str, node_id: str, instance: str = "") -> str:
    """Where a node's claims live (``instance`` empty: the folder of all of them)."""
    folder = f"{task_id}/presence/{node_id}"
    return f"{folder}/{instance}.json" if instance else folder


def read_claim(store: Store, task: TaskConfig, node_id: str, key: str) -> Claim | None:
    """The claim under ``key`` if it is ``node_id``'s and signed by it, else None."""
    try:
        record = json.loads(store.read(key, limit=16 << 10))
        raw: dict[str, Any] = record["claim"]
        signature = base64.b64decode(record["signature"], validate=True)
        claim = Claim(**raw)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("presence: ignored an unreadable claim %s: %s", key, exc)
        return None
    valid = task.verify(node_id, signature, canonical_json(raw))
    if (
        not valid
        or claim.node_id != node_id
        or key != claim_key(task.task_id, node_id, claim.instance)
    ):
        log.warning("presence: ignored a claim that %s did not sign: %s", node_id, key)
        return None
    return claim


class Presence:
    """This process's claim of its node id (see the module docstring).

    Args:
        channel: a connected channel of the node (its storage, task and key).
        heartbeat: seconds between heartbeats.
        stale_after: seconds without a heartbeat after which another machine's claim
            is considered dead.
    """

    def __init__(
        self, channel: Channel, *, heartbeat: float = HEARTBEAT, stale_after: float = STALE_AFTER
    ) -> None:
        self.task = channel.task
        self.identity = channel.identity
        self.store = Store(channel.url, channel.storage_options)  # the thread's own handle
        self.heartbeat, self.stale_after = heartbeat, stale_after
        now = time.time()
        self.claim = Claim(
            task_id=self.task.task_id,
            node_id=self.identity.node_id,
            instance=uuid.uuid4().hex[:12],
            host=socket.gethostname(),
            machine=machine_id(),
            pid=os.getpid(),
            started_at=now,
            seen_at=now,
            beat=0,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def prefix(self) -> str:
        return claim_key(self.task.task_id, self.identity.node_id)

    def _key(self, instance: str) -> str:
        return claim_key(self.task.task_id, self.identity.node_id, instance)

    # -- claims in storage ---------------------------------------------------------
    def _write(self, claim: Claim) -> None:
        data = canonical_json(asdict(claim))
        record = {
            "claim": asdict(claim),
            "signature": base64.b64encode(self.identity.sign(data)).decode("ascii"),
        }
        self.store.publish(self._key(claim.instance), json.dumps(record).encode(), durable=False)

    def _read(self, key: str) -> Claim | None:
        """The claim under ``key`` if it is this node's and signed by it, else None."""
        return read_claim(self.store, self.task, self.identity.node_id, key)

    def _rivals(self) -> list[tuple[str, Claim]]:
        mine = self._key(self.claim.instance)
        found = []
        for key in self.store.list_keys(self.prefix):
            if key != mine and (claim := self._read(key)) is not None:
                found.append((key, claim))
        return sorted(found, key=lambda kc: (kc[1].started_at, kc[1].instance))

    def _alive(self, key: str, claim: Claim) -> Claim | None:
        """The rival's latest claim if its process lives, None if it is gone."""
        if claim.machine == self.claim.machine:
            return claim if pid_runs(claim.pid) else None
        deadline = time.monotonic() + self.stale_after
        while time.monotonic() < deadline:
            time.sleep(_LOOK_EVERY)
            latest = self._read(key)
            if latest is None:
                return None  # released
            if latest.beat != claim.beat:
                return latest
        return None

    # -- life cycle ----------------------------------------------------------------
    def acquire(self) -> None:
        """Claim the node id, or raise if another live process holds it.

        Raises:
            NodeBusyError: naming the live process, before this one wrote anything else.
            StorageError: the storage failed.
        """
        now = time.time()  # stamped as it is published: the order every process agrees on
        self.claim = Claim(**{**asdict(self.claim), "started_at": now, "seen_at": now})
        self._write(self.claim)
        self._start_heartbeat()  # a rival starting now must see this claim beat
        try:
            rivals = self._rivals()
            time.sleep(_SETTLE)  # a rival's claim published just before ours is listed now
            rivals += [kc for kc in self._rivals() if kc[0] not in dict(rivals)]
            for key, claim in rivals:
                earlier = (claim.started_at, claim.instance) < (
                    self.claim.started_at,
                    self.claim.instance,
                )
                if not earlier:
                    continue  # a later process defers to this one
                latest = self._alive(key, claim)
                if latest is not None:
                    raise NodeBusyError(
                        f"node {claim.node_id!r} of task {claim.task_id!r} already runs as "
                        f"{latest.describe()}; this process stops before writing anything; "
                        "hint: run each node id once; if that process is gone, start this one "
                        f"again in {self.stale_after:g} s"
                    )
                log.warning(
                    "node %s: the claim of %s is stale (its process is gone); taking over",
                    claim.node_id,
                    claim.describe(),
                )
                self.store.delete(key)
        except BaseException:
            self.release()
            raise

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            claim = self.claim
            while not self._stop.wait(self.heartbeat):
                claim = Claim(**{**asdict(claim), "beat": claim.beat + 1, "seen_at": time.time()})
                try:
                    self._write(claim)
                except ChannelError as exc:
                    log.warning("presence: heartbeat of %s failed: %s", claim.node_id, exc)

        self._thread = threading.Thread(target=beat, name="lightning-fed-presence", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove this process's claim (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat + 5)
            self._thread = None
        try:
            self.store.delete(self._key(self.claim.instance))
        except ChannelError as exc:
            log.warning("presence: could not remove the claim of %s: %s", self.claim.node_id, exc)
