"""Looking into and removing a task's storage without any node's keys."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_fed.channel.errors import StorageError
from lightning_fed.channel.names import validate_name
from lightning_fed.channel.store import Store


@dataclass
class TaskSummary:
    """What a task's storage holds right now.

    Attributes:
        pending: (recipient, sender) -> number of envelopes not yet consumed.
        blobs: sender -> number of tensor blobs stored.
        blob_bytes: sender -> total bytes of those blobs.
        other: keys that are neither envelopes nor blobs.
    """

    task_id: str
    pending: Counter[tuple[str, str]] = field(default_factory=Counter)
    blobs: Counter[str] = field(default_factory=Counter)
    blob_bytes: Counter[str] = field(default_factory=Counter)
    other: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """A human-readable report."""
        out = [f"task {self.task_id!r}"]
        if not (self.pending or self.blobs or self.other):
            out.append("  (empty)")
        for (recipient, sender), n in sorted(self.pending.items()):
            out.append(f"  {n:6d} unread message(s) {sender} -> {recipient}")
        for sender, n in sorted(self.blobs.items()):
            out.append(f"  {n:6d} tensor blob(s) from {sender} ({_size(self.blob_bytes[sender])})")
        out.extend(f"  other: {k}" for k in self.other)
        return out


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def inspect_task(
    url: str, task_id: str, storage_options: Mapping[str, Any] | None = None
) -> TaskSummary:
    """Summarise the unread messages and stored blobs of ``task_id`` under ``url``."""
    validate_name(task_id, "task id")
    store = Store(url, storage_options)
    summary = TaskSummary(task_id)
    for key in store.list_keys(task_id):
        parts = key.split("/")
        if len(parts) == 5 and parts[1] == "inbox":
            summary.pending[(parts[2], parts[3])] += 1
        elif len(parts) == 4 and parts[1] == "blobs":
            summary.blobs[parts[2]] += 1
            summary.blob_bytes[parts[2]] += int(store.fs.size(store.path(key)) or 0)
        else:
            summary.other.append(key)
    return summary


def remove_task(url: str, task_id: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete everything stored for ``task_id`` under ``url`` (messages and blobs)."""
    validate_name(task_id, "task id")
    Store(url, storage_options).delete_tree(task_id)


#: Where :func:`check_storage` writes its probe (never a task's folder).
PROBE_PREFIX = ".lightning-fed-check"


def check_storage(
    url: str, storage_options: Mapping[str, Any] | None = None, *, create_bucket: bool = False
) -> list[str]:
    """Try what a party does with the storage: find it, publish, list, read, delete.

    Args:
        url: the channel URL.
        storage_options: fsspec options (credentials, ``endpoint_url``...).
        create_bucket: make an object store's bucket first if it does not exist.

    Returns:
        One line per step that passed.

    Raises:
        StorageError: at the first step that failed, naming it and what to do.
    """
    store = Store(url, storage_options)
    done = []
    if create_bucket:
        created = store.create_bucket()
        if store.bucket is not None:
            done.append(f"bucket {store.bucket!r} " + ("created" if created else "exists already"))
    store.check()
    done.append(f"{url} is reachable" + (f" (bucket {store.bucket!r})" if store.bucket else ""))
    key = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
    payload = uuid.uuid4().bytes
    store.publish(key, payload)
    try:
        done.append("publishing an object works")
        if key not in store.list_keys(PROBE_PREFIX):
            raise StorageError(
                "list", key, url, FileNotFoundError("a fresh listing misses the object just put")
            )
        done.append("listing shows it at once")
        if store.read(key) != payload:
            raise StorageError("read", key, url, ValueError("the bytes read back differ"))
        done.append("reading it back gives the same bytes")
    finally:
        store.delete(key)
    done.append("deleting it works")
    return done
