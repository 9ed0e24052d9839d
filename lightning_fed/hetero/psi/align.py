"""The entry point of sample alignment: every party learns the IDs all parties share.

The host calls ``private_intersection(channel, ids, host=<its id>,
collaborators=[...])``; each collaborator calls it with ``host=`` only. After the
session handshake (:mod:`.session`), two parties run the two-party protocol
(:mod:`.two_party`) and three or more the ring protocol (:mod:`.ring`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from lightning_fed.channel import Channel
from lightning_fed.hetero.psi.ecdh import IdLike, default_workers
from lightning_fed.hetero.psi.ring import intersect_ring
from lightning_fed.hetero.psi.session import SessionError, host_session, join_session
from lightning_fed.hetero.psi.two_party import PsiError, PsiResult, intersect


def private_intersection(
    channel: Channel,
    ids: Sequence[IdLike],
    *,
    host: str,
    collaborators: Sequence[str] | None = None,
    context: bytes | None = None,
    timeout: float = 600.0,
    workers: int | None = None,
) -> PsiResult:
    """The IDs of ``ids`` that every party of the run holds, in the order given.

    Args:
        channel: a connected channel of this node.
        ids: this party's IDs (str, int or bytes; each once).
        host: the host's node id (this node's on the host).
        collaborators: on the host, the collaborators' node ids; None elsewhere.
        context: domain separation of the hashed IDs (default: the task id).
        timeout: seconds for the handshake and, again, for the intersection.
        workers: processes for blinding (default: this machine's cores).

    Raises:
        PsiError: a party did not take part in time or sent a bad message.
        ValueError: bad arguments, or an ID given twice.
    """
    me = channel.node_id
    if (me == host) != (collaborators is not None):
        raise ValueError(
            "give collaborators=[...] on the host and only host=... on a collaborator; got "
            f"host={host!r}, collaborators={collaborators!r} on node {me!r}"
        )
    try:
        if collaborators is not None:
            session = host_session(channel, list(collaborators), timeout)
        else:
            session = join_session(channel, host, timeout)
    except SessionError as exc:
        raise PsiError(str(exc)) from None
    ctx = channel.task.task_id.encode() if context is None else context
    n_workers = default_workers() if workers is None else workers
    if len(session.parties) == 2:
        peer = session.parties[1] if me == host else host
        result = intersect(channel, peer, ids, context=ctx, timeout=timeout, workers=n_workers)
    else:
        result = intersect_ring(
            channel, session, ids, context=ctx, timeout=timeout, workers=n_workers
        )
    return replace(result, session=session.id)
