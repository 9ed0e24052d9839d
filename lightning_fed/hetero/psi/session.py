"""Agreeing on one run of an intersection among a host and its collaborators.

The host picks a random session id and the parties' order and sends ``psi-start``
to every collaborator; each answers ``psi-join`` for the newest start it has seen;
once all joined the current session, the host sends ``psi-go``. A start, join or go
left over from an earlier run carries another session id and is ignored, so a run
never mixes with a crashed predecessor's messages.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_fed.channel import Channel, ChannelTimeoutError, Message
from lightning_fed.errors import LightningFedError

START, JOIN, GO = "psi-start", "psi-join", "psi-go"


class SessionError(LightningFedError, RuntimeError):
    """The parties could not agree on a run in time."""


@dataclass(frozen=True)
class Session:
    """One agreed run: its id and the parties, host first."""

    id: str
    parties: tuple[str, ...]

    @property
    def host(self) -> str:
        return self.parties[0]


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ChannelTimeoutError("psi session", [], 0.001)
    return left


def host_session(channel: Channel, collaborators: Sequence[str], timeout: float) -> Session:
    """Start a run with ``collaborators`` and wait until every one of them joined it.

    Raises:
        SessionError: some collaborator did not join within ``timeout``.
    """
    if not collaborators or len(set(collaborators)) != len(collaborators):
        raise ValueError(f"collaborators must be distinct node ids, got {list(collaborators)!r}")
    if channel.node_id in collaborators:
        raise ValueError(f"the host {channel.node_id!r} cannot also be one of its collaborators")
    session = Session(secrets.token_hex(16), (channel.node_id, *collaborators))
    body = {"session": session.id, "parties": list(session.parties)}
    channel.send(START, body, to=list(collaborators))
    deadline = time.monotonic() + timeout
    waiting = set(collaborators)
    try:
        while waiting:
            msg = channel.receive(JOIN, sender=sorted(waiting), timeout=_left(deadline))
            if msg.body.get("session") == session.id:
                waiting.discard(msg.sender)
    except ChannelTimeoutError:
        raise SessionError(
            f"{', '.join(sorted(waiting))} did not join the intersection within "
            f"{timeout:g} s; hint: start it there with host={channel.node_id!r}"
        ) from None
    channel.send(GO, {"session": session.id}, to=list(collaborators))
    return session


def join_session(channel: Channel, host: str, timeout: float) -> Session:
    """Wait for the host's newest start, join it, and wait for its go.

    Raises:
        SessionError: no start, or no go for the joined run, within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    current: Session | None = None
    try:
        while True:
            msg = channel.receive([START, GO], sender=host, timeout=_left(deadline))
            if msg.kind == START:
                started = _parse_start(msg)
                if started is not None:
                    current = started
                    channel.send(JOIN, {"session": current.id}, to=host)
            elif current is not None and msg.body.get("session") == current.id:
                return current
    except ChannelTimeoutError:
        what = "the go of the run it joined" if current else "a start of the intersection"
        raise SessionError(
            f"no {what} from host {host!r} within {timeout:g} s; hint: start the "
            "intersection on the host, listing this node among its collaborators"
        ) from None


def _parse_start(msg: Message) -> Session | None:
    session, parties = msg.body.get("session"), msg.body.get("parties")
    if not isinstance(session, str) or not isinstance(parties, list):
        return None
    if not all(isinstance(p, str) for p in parties) or len(set(parties)) != len(parties):
        return None
    if len(parties) < 2 or parties[0] != msg.sender or msg.recipient not in parties:
        return None
    return Session(session, tuple(parties))
