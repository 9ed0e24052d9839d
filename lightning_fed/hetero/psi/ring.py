"""Private intersection of three or more parties' IDs: the ring protocol.

With parties ``P_0`` (the host) .. ``P_N`` in a ring, ``k_i`` each party's blinding
key, ``K`` all of them applied (``F(x) = [K] h(x)``):

A. *Comparison.* Each owner blinds and shuffles its IDs and sends them round the
   ring; every party applies its key and shuffles again; the last one sends the
   fully blinded list ``F(X_i)`` to the host. The host intersects the N+1 lists:
   ``F(I)``. Nobody, the host included, can tell which ID a value of such a list
   stands for: every list was reshuffled by parties other than its owner.
B. *Mapping.* Each owner blinds its IDs with ``k_i`` and a second secret ``r_i`` and
   sends them round the ring in its own order; every party applies its key, and
   the last one, the owner's *helper* (the previous party in the ring), also
   applies a fresh secret ``t_i``. The owner gets ``[t_i r_i K] h(X_i)`` back, in
   its order.
C. *Result.* The host sends ``F(I)`` to every helper; helper ``P_{i-1}`` applies
   ``t_i`` and sends it to ``P_i``, which applies ``r_i`` and keeps its IDs whose
   mapped value is in the result.

Why nobody learns more than ``I``: the lists of step A travel in disjoint arcs of
keys, so no party ever holds two lists under the same keys; only the host holds
fully blinded lists, and they are unlinkable to IDs. A party's mapping lives under
``t_i``, which it does not know, so it cannot compare the host's lists, or anything
else it saw, with its own IDs; and it only ever receives ``F(I)`` under ``t_i``.
The host learns the size of every partial intersection (how many values two or
more lists share), not which IDs; every party learns the others' set sizes.
See docs/psi.md for the full argument. Semi-honest, non-colluding parties.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lightning_fed.channel import BlobIntegrityError, Channel, ChannelTimeoutError, Message
from lightning_fed.hetero.psi.ecdh import (
    IdLike,
    InvalidPointError,
    PsiKey,
    check_unique,
    hash_ids,
    members,
    point_set,
)
from lightning_fed.hetero.psi.session import Session
from lightning_fed.hetero.psi.two_party import PsiError, PsiResult, points_of

log = logging.getLogger(__name__)

COMPARE, FULL, MAP, MAPPED, RESULT, HELPED = (
    "psi-ring-a",
    "psi-ring-full",
    "psi-ring-b",
    "psi-ring-mapped",
    "psi-ring-result",
    "psi-ring-helped",
)
KINDS = [COMPARE, FULL, MAP, MAPPED, RESULT, HELPED]


def _shuffled(points: np.ndarray) -> np.ndarray:
    order = np.random.default_rng(secrets.randbits(128)).permutation(len(points))
    return points[order]


@dataclass
class _State:
    """What one party of a ring run holds while the messages come."""

    session: Session
    me: int
    k: PsiKey = field(default_factory=PsiKey.generate)
    r: PsiKey = field(default_factory=PsiKey.generate)
    t_for_next: PsiKey | None = None  # the helper's secret for the next party's mapping
    full: dict[int, set[bytes]] = field(default_factory=dict)  # host: F(X_i) by owner
    result: np.ndarray | None = None  # a helper's F(I), kept until it has t_for_next
    mapped: np.ndarray | None = None  # [t r K] h(own IDs), own order
    helped: set[bytes] | None = None  # [r t] F(I)
    passed_a: int = 0
    passed_b: int = 0
    helped_next: bool = False
    sizes: dict[int, int] = field(default_factory=dict)

    @property
    def m(self) -> int:
        return len(self.session.parties)

    def node(self, i: int) -> str:
        return self.session.parties[i % self.m]

    @property
    def is_host(self) -> bool:
        return self.me == 0

    def done(self) -> bool:
        duties = self.passed_a == self.m - 1 and self.passed_b == self.m - 1 and self.helped_next
        host_done = not self.is_host or len(self.full) == self.m
        return duties and host_done and self.mapped is not None and self.helped is not None


def _owner(msg: Message, state: _State) -> int:
    owner = msg.body.get("owner")
    if isinstance(owner, bool) or not isinstance(owner, int) or not 0 <= owner < state.m:
        raise InvalidPointError(f"{msg.kind} from {msg.sender!r} names no valid owner")
    return owner


def _hops(msg: Message, state: _State) -> int:
    hops = msg.body.get("hops")
    if isinstance(hops, bool) or not isinstance(hops, int) or not 1 <= hops < state.m:
        raise InvalidPointError(f"{msg.kind} from {msg.sender!r} has no valid hop count")
    return hops


def _send(
    channel: Channel, kind: str, state: _State, to: str, points: np.ndarray, **body: int
) -> None:
    payload = {"session": state.session.id, **body}
    channel.send(kind, payload, to=to, tensors={"points": torch.from_numpy(points)})


def intersect_ring(
    channel: Channel,
    session: Session,
    ids: Sequence[IdLike],
    *,
    context: bytes,
    timeout: float,
    workers: int,
) -> PsiResult:
    """This party's part of a ring run agreed in ``session`` (three or more parties)."""
    started = time.monotonic()
    deadline = started + timeout
    check_unique(ids)
    me = session.parties.index(channel.node_id)
    st = _State(session, me)
    hashed = hash_ids(ids, context)
    own_k = st.k.blind(hashed, workers)
    sent = received = 0

    def send(kind: str, to: str, points: np.ndarray, **body: int) -> None:
        nonlocal sent
        _send(channel, kind, st, to, points, **body)
        sent += points.nbytes

    send(COMPARE, st.node(me + 1), _shuffled(own_k), owner=me, hops=1)
    send(MAP, st.node(me + 1), st.r.blind(own_k, workers), owner=me, hops=1)

    def to_host_or_keep(owner: int, full: np.ndarray) -> None:
        if st.is_host:
            st.full[owner] = point_set(full)
        else:
            send(FULL, st.node(0), full, owner=owner)

    def maybe_publish() -> None:
        if st.is_host and len(st.full) == st.m and st.result is None:
            common = set.intersection(*st.full.values())
            result = np.frombuffer(b"".join(sorted(common)), np.uint8).reshape(-1, 32)
            st.result = _shuffled(result)
            for i in range(1, st.m):
                send(RESULT, st.node(i), st.result)

    def maybe_help() -> None:
        if st.result is not None and st.t_for_next is not None and not st.helped_next:
            send(HELPED, st.node(me + 1), st.t_for_next.blind(st.result, workers))
            st.helped_next = True

    while not st.done():
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise ChannelTimeoutError("psi ring", [], timeout)
            msg = channel.receive(KINDS, sender=list(session.parties), timeout=left)
            if msg.body.get("session") != session.id:
                log.info("psi %s: ignored %s of an earlier run", channel.node_id, msg.kind)
                continue
            points = points_of(msg)
            received += points.nbytes
            if msg.kind == COMPARE:
                owner, hops = _owner(msg, st), _hops(msg, st)
                st.sizes[owner] = len(points)  # every hop keeps the owner's set size
                blinded = _shuffled(st.k.blind(points, workers))
                st.passed_a += 1
                if hops == st.m - 1:
                    to_host_or_keep(owner, blinded)
                else:
                    send(COMPARE, st.node(me + 1), blinded, owner=owner, hops=hops + 1)
            elif msg.kind == MAP:
                owner, hops = _owner(msg, st), _hops(msg, st)
                blinded = st.k.blind(points, workers)
                st.passed_b += 1
                if hops == st.m - 1:  # this party is the owner's helper
                    st.t_for_next = PsiKey.generate()
                    send(MAPPED, st.node(owner), st.t_for_next.blind(blinded, workers))
                else:
                    send(MAP, st.node(me + 1), blinded, owner=owner, hops=hops + 1)
            elif msg.kind == FULL and st.is_host:
                st.full[_owner(msg, st)] = point_set(points)
            elif msg.kind == RESULT and msg.sender == st.node(0):
                st.result = points
            elif msg.kind == MAPPED:
                if len(points) != len(ids):
                    raise InvalidPointError(f"{len(points)} mapped points for {len(ids)} IDs")
                st.mapped = points
            elif msg.kind == HELPED and msg.sender == st.node(me - 1):
                st.helped = point_set(st.r.blind(points, workers))
            maybe_publish()
            maybe_help()
        except ChannelTimeoutError:
            raise PsiError(
                f"the ring intersection of {', '.join(session.parties)} did not finish within "
                f"timeout={timeout:g} s; hint: check every party's log, or raise the timeout"
            ) from None
        except (InvalidPointError, BlobIntegrityError) as exc:
            raise PsiError(f"the ring intersection failed: {exc}") from None
    assert st.mapped is not None and st.helped is not None
    keep = np.flatnonzero(members(st.mapped, st.helped))
    return PsiResult(
        ids=[ids[int(i)] for i in keep],
        peer_sizes={st.node(i): n for i, n in sorted(st.sizes.items()) if i != me},
        seconds=time.monotonic() - started,
        bytes_sent=sent,
        bytes_received=received,
    )
