"""Whether other parties' processes still live, from their presence claims.

Every party heartbeats a signed claim of its node id (:mod:`.presence`). A party waiting
for others reads their claims now and then: a claim whose process ran on this machine
and no longer does, a claim that stopped beating for ``stale_after`` seconds, or no
claim at all (its process ended and released it) means that party is gone, and the
waiting party stops waiting for it at once instead of at its timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from lightning_fed.channel import Channel, ChannelError, Store
from lightning_fed.node.presence import (
    HEARTBEAT,
    STALE_AFTER,
    Claim,
    claim_key,
    machine_id,
    pid_runs,
    read_claim,
)

log = logging.getLogger(__name__)


class PeerWatch:
    """Tells which of a set of peers are gone, looking at most every ``every`` seconds.

    Args:
        channel: a connected channel (its storage and task).
        every: seconds between two looks at the storage (a look lists the claims).
        stale_after: seconds a claim from another machine may go without a heartbeat.
    """

    def __init__(
        self, channel: Channel, *, every: float = HEARTBEAT, stale_after: float = STALE_AFTER
    ) -> None:
        self.task = channel.task
        self.store: Store = channel.store
        self.every, self.stale_after = every, stale_after
        self.machine = machine_id()
        self._next_look = time.monotonic() + every
        self._beats: dict[str, tuple[int, float]] = {}  # claim key -> (beat, when it changed)

    def gone(self, peers: Iterable[str]) -> dict[str, str]:
        """Of ``peers``, those whose process is gone, each with why; ``{}`` between looks
        and when the storage cannot be read (waiting goes on as before)."""
        wanted = sorted(set(peers))
        now = time.monotonic()
        if not wanted or now < self._next_look:
            return {}
        self._next_look = now + self.every
        try:
            keys = self.store.list_keys(f"{self.task.task_id}/presence")
        except ChannelError as exc:
            log.debug("liveness: cannot list presence claims: %s", exc)
            return {}
        out = {}
        for peer in wanted:
            folder = claim_key(self.task.task_id, peer) + "/"
            claims = [
                (k, c)
                for k in keys
                if k.startswith(folder) and (c := read_claim(self.store, self.task, peer, k))
            ]
            why = self._why_gone(claims, now)
            if why is not None:
                out[peer] = why
        return out

    def _why_gone(self, claims: list[tuple[str, Claim]], now: float) -> str | None:
        if not claims:
            return "it holds no presence claim: its process ended"
        reasons = []
        for key, claim in claims:
            if claim.machine == self.machine:
                if pid_runs(claim.pid):
                    return None
                reasons.append(f"its process (pid {claim.pid} on this machine) is gone")
                continue
            beat, since = self._beats.get(key, (claim.beat, now))
            if claim.beat != beat:
                since = now
            self._beats[key] = (claim.beat, since)
            if now - since < self.stale_after:
                return None
            reasons.append(
                f"its process (pid {claim.pid} on host {claim.host}) has not beaten for "
                f"{now - since:.0f} s"
            )
        return "; ".join(reasons)
