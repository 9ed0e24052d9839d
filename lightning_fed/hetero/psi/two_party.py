"""Two-party ECDH private set intersection over a channel (both parties learn it).

Each party calls :func:`intersect` with the other's node id; the exchange is
symmetric, so both blind at the same time::

    A -> B   psi-blinded  {nonce_A}                 [a] h(X_A), shuffled by A
    B -> A   psi-blinded  {nonce_B}                 [b] h(X_B), shuffled by B
    A -> B   psi-double   {echo: nonce_B, nonce_A}  [a][b] h(X_B), in B's order
    B -> A   psi-double   {echo: nonce_A, nonce_B}  [b][a] h(X_A), in A's order

A maps the doubly blinded list of its own IDs (its order) and keeps those that are
in the doubly blinded list of B's IDs, which A computed itself; B does the same.
Nonces tie each reply to the request it answers, so a message left over from an
earlier run of the same task is answered or ignored, never mixed in.

What each party learns: the intersection and the size of the other's set. It sees
only points blinded with the other's secret scalar, which are pseudorandom without
it (DDH on Curve25519, SHA-256 as a random oracle): no ID and no plain hash of an ID
crosses the channel. The security model is semi-honest; see docs/psi.md.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lightning_fed.channel import BlobIntegrityError, Channel, ChannelTimeoutError, Message
from lightning_fed.errors import LightningFedError
from lightning_fed.hetero.psi.ecdh import (
    IdLike,
    InvalidPointError,
    PsiKey,
    check_points,
    check_unique,
    default_workers,
    hash_ids,
    members,
    point_set,
)

log = logging.getLogger(__name__)

BLINDED = "psi-blinded"
DOUBLE = "psi-double"


class PsiError(LightningFedError, RuntimeError):
    """The intersection could not be computed (timeout, or a peer's bad message)."""


@dataclass(frozen=True)
class PsiResult:
    """One party's outcome of an intersection."""

    ids: list[IdLike]
    """This party's IDs that are in the intersection, in the order they were given."""
    peer_sizes: dict[str, int]
    """How many IDs each other party has (every party learns them)."""
    seconds: float
    bytes_sent: int
    """Bytes of points this party sent (the channel adds small envelopes)."""
    bytes_received: int
    session: str = ""
    """The run's id agreed in the handshake (empty from :func:`intersect` alone)."""


def points_of(msg: Message) -> np.ndarray:
    """The checked ``(n, 32)`` points a PSI message carries, or InvalidPointError."""
    tensor = msg.tensors.get("points")
    if tensor is None or tensor.dtype != torch.uint8:
        raise InvalidPointError(f"{msg.kind} from {msg.sender!r} has no uint8 'points' tensor")
    return check_points(tensor.numpy(), f"{msg.kind} from {msg.sender!r}")


def _nonce(msg: Message, field: str) -> str:
    value = msg.body.get(field)
    if not isinstance(value, str) or not value:
        raise InvalidPointError(f"{msg.kind} from {msg.sender!r} has no {field!r} nonce")
    return value


def intersect(
    channel: Channel,
    peer: str,
    ids: Sequence[IdLike],
    *,
    context: bytes | None = None,
    timeout: float = 600.0,
    workers: int | None = None,
) -> PsiResult:
    """Compute the intersection of this party's ``ids`` with ``peer``'s.

    Args:
        channel: a connected channel of this node.
        peer: the other party's node id (it calls ``intersect`` with this node's id).
        ids: this party's IDs (str, int or bytes; each once).
        context: domain separation for hashing (default: the task id); both parties
            must use the same.
        timeout: seconds the whole exchange may take.
        workers: processes for blinding (default: this machine's cores).

    Raises:
        PsiError: the peer did not answer within ``timeout`` or sent a bad message.
        ValueError: an ID appears twice.
    """
    started = time.monotonic()
    deadline = started + timeout
    check_unique(ids)
    n = len(ids)
    workers = default_workers() if workers is None else workers
    key = PsiKey.generate()
    order = np.random.default_rng(secrets.randbits(128)).permutation(n)
    ctx = channel.task.task_id.encode() if context is None else context
    mine = key.blind(hash_ids([ids[i] for i in order], ctx), workers)
    nonce = secrets.token_hex(16)
    channel.send(BLINDED, {"nonce": nonce}, to=peer, tensors={"points": torch.from_numpy(mine)})
    sent, received = mine.nbytes, 0
    log.info("psi %s: sent %d blinded IDs to %s", channel.node_id, n, peer)

    theirs: dict[str, set[bytes]] = {}  # the peer's doubly blinded sets, by its nonce
    own_double: np.ndarray | None = None
    peer_nonce: str | None = None
    while own_double is None or peer_nonce not in theirs:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise ChannelTimeoutError("psi", [peer], timeout)
            msg = channel.receive([BLINDED, DOUBLE], sender=peer, timeout=left)
            points = points_of(msg)
            received += points.nbytes
            if msg.kind == BLINDED:
                their_nonce = _nonce(msg, "nonce")
                doubled = key.blind(points, workers)
                theirs[their_nonce] = point_set(doubled)
                channel.send(
                    DOUBLE,
                    {"echo": their_nonce, "nonce": nonce},
                    to=peer,
                    tensors={"points": torch.from_numpy(doubled)},
                )
                sent += doubled.nbytes
            elif _nonce(msg, "echo") == nonce:
                if len(points) != n:
                    raise InvalidPointError(
                        f"{DOUBLE} from {peer!r} has {len(points)} points for this party's {n}"
                    )
                own_double, peer_nonce = points, _nonce(msg, "nonce")
            else:
                log.info("psi %s: ignored a reply to an earlier run from %s", channel.node_id, peer)
        except ChannelTimeoutError:
            raise PsiError(
                f"no answer from {peer!r} within timeout={timeout:g} s of the intersection; "
                f"hint: start the intersection on {peer!r} too, with this node "
                f"({channel.node_id!r}) as its peer, or raise the timeout"
            ) from None
        except (InvalidPointError, BlobIntegrityError) as exc:
            raise PsiError(f"the intersection with {peer!r} failed: {exc}") from None
    assert own_double is not None and peer_nonce is not None
    mask = members(own_double, theirs[peer_nonce])
    kept = np.sort(order[mask])  # back to the caller's order
    peer_size = len(theirs[peer_nonce])
    result = PsiResult(
        ids=[ids[i] for i in kept],
        peer_sizes={peer: peer_size},
        seconds=time.monotonic() - started,
        bytes_sent=sent,
        bytes_received=received,
    )
    log.info(
        "psi %s: %d of %d IDs in the intersection with %s (%d IDs) in %.1f s",
        channel.node_id,
        len(result.ids),
        n,
        peer,
        peer_size,
        result.seconds,
    )
    return result
