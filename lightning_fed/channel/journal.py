"""A node's local record of consumed messages, so replays are refused across restarts.

The channel's in-memory sequence check stops a replay while the receiver runs. A
receiver that restarts forgets it, and a storage operator could put a consumed
envelope back. With a journal (``Channel(state_dir=...)``) every consumed
``(sender, seq)`` is appended to a local file, fsynced, and loaded again on
``connect``, so such an envelope is rejected as a replay after a restart too.
The journal lives on the node's own disk, never on the shared storage.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from lightning_fed.channel.errors import ConfigError


class ConsumedJournal:
    """Append-only ``sender seq`` lines in ``<state_dir>/<task_id>.<node_id>.consumed``."""

    def __init__(self, state_dir: str | os.PathLike[str], task_id: str, node_id: str) -> None:
        self.path = Path(state_dir) / f"{task_id}.{node_id}.consumed"
        self.consumed: dict[str, set[int]] = {}

    def load(self) -> None:
        """Read the journal (a missing file is an empty journal)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = self.path.read_text(encoding="ascii") if self.path.exists() else ""
        except OSError as exc:
            raise ConfigError(
                f"cannot use the channel's state file {str(self.path)!r}: {exc}; "
                "hint: state_dir must be a writable local folder"
            ) from exc
        for number, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                if number == len(text.splitlines()):
                    break  # a last line cut short by a crash: its message was not consumed
                raise ConfigError(f"line {number} of {str(self.path)!r} is corrupt: {line!r}")
            self.consumed.setdefault(parts[0], set()).add(int(parts[1]))

    def seen(self, sender: str, seq: int) -> bool:
        """Whether ``sender``'s message ``seq`` was consumed before."""
        return seq in self.consumed.get(sender, ())

    def record(self, entries: Iterable[tuple[str, int]]) -> None:
        """Append consumed ``(sender, seq)`` pairs and fsync."""
        lines = "".join(f"{sender} {seq}\n" for sender, seq in entries)
        if not lines:
            return
        with open(self.path, "a", encoding="ascii") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())
        for line in lines.splitlines():
            sender, seq = line.split()
            self.consumed.setdefault(sender, set()).add(int(seq))
