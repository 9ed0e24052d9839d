"""The aggregator's secure round: SecAgg+'s steps over the channel, around the update loop.

:class:`~lightning_fed.fedavg.aggregator.AggregatorRole` sends the round, then
:meth:`SecureRoundServer.prepare` runs the key exchange (keys, roster, shares, relay,
check), the role's update loop folds masked vectors through :meth:`add`, and
:meth:`result` collects the survivors' shares, unmasks the sum and turns it into the
round's aggregate: the sample-weighted mean of the clients' models, as plain FedAvg
makes it, within the quantisation bound.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from lightning_fed.algorithms import RoundAggregate
from lightning_fed.algorithms.aggregate import TensorSpec
from lightning_fed.channel import Message
from lightning_fed.fedavg import protocol as P
from lightning_fed.fedavg.errors import RoundFailedError
from lightning_fed.privacy.errors import SecAggError
from lightning_fed.privacy.secagg import Advert, Reveal, SecAggServer
from lightning_fed.privacy.settings import SecureAggregation, SecureRound
from lightning_fed.privacy.vector import Layout

if TYPE_CHECKING:
    from lightning_fed.fedavg.aggregator import AggregatorRole

log = logging.getLogger(__name__)

#: The tensor of an update that carries the masked vector.
MASKED = "masked"
#: Tensor name prefixes of sealed shares: to a neighbour (upload), from one (relay).
TO, FROM = "to/", "from/"


def round_context(task_id: str, round: int, attempt: str) -> bytes:
    """What every key and share of one round is bound to."""
    return f"{task_id}|{round}|{attempt}".encode()


class SecureRoundServer:
    """One secure round on the aggregator (see :mod:`lightning_fed.privacy.secagg`)."""

    def __init__(
        self,
        role: AggregatorRole,
        settings: SecureAggregation,
        spec: SecureRound,
        round: int,
        attempt: str,
        chosen: list[str],
        layout: Layout,
    ) -> None:
        self.role = role
        self.settings = settings
        self.spec = spec
        self.round = round
        self.attempt = attempt
        self.layout = layout
        self.server = SecAggServer(
            round_context(role.channel.task.task_id, round, attempt),
            chosen,
            layout.size,
            spec.modulus_bits,
            settings.degree,
            spec.threshold,
            bytes.fromhex(spec.seed),
        )

    @property
    def upload_spec(self) -> dict[str, TensorSpec]:
        """What each masked update carries: the packed residues of one vector."""
        return {MASKED: TensorSpec((self.layout.size * self.spec.packed_width,), torch.uint8)}

    def _send(
        self,
        kind: str,
        to: list[str],
        body: dict[str, object],
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.role.channel.send(
            kind, {"attempt": self.attempt, **body}, to=to, round=self.round, tensors=tensors
        )

    def _collect(
        self,
        kind: str,
        waiting: set[str],
        take: Callable[[Message], str | None],
        rejected: dict[str, str],
        what: str,
        deadline: float | None = None,
        done: Callable[[], bool] | None = None,
    ) -> None:
        if deadline is None:
            deadline = time.monotonic() + self.settings.timeout
        self.role.collect(
            kind, self.round, self.attempt, waiting, deadline, take, rejected, what, done
        )
        if done is None or not done():
            for late in sorted(waiting):
                rejected.setdefault(late, f"no {what} within {self.settings.timeout:g} s")

    def _fail(self, why: str) -> RoundFailedError:
        return RoundFailedError(f"round {self.round}: secure aggregation: {why}")

    # -- steps 1 to 4, before the clients train ------------------------------------------
    def prepare(self, rejected: dict[str, str]) -> list[str]:
        """Run the key exchange; returns the clients that will send masked updates.

        Raises:
            RoundFailedError: too few clients got through it (names who and why).
        """
        server = self.server
        min_clients = self.role.config.min_clients

        def advert(msg: Message) -> str | None:
            try:
                server.add_advert(msg.sender, Advert.from_body(msg.body))
            except ValueError as exc:
                return f"malformed keys: {exc}"
            return None

        self._collect(P.SA_KEYS, set(server.clients), advert, rejected, "keys")
        try:
            roster = server.make_roster(min_clients)
        except SecAggError as exc:
            raise self._fail(f"{exc}; {_named(rejected)}") from None
        self._send(P.SA_ROSTER, roster.nodes, roster.to_body())

        def shares(msg: Message) -> str | None:
            sealed = {}
            for name, t in msg.tensors.items():
                if not name.startswith(TO) or t.dtype != torch.uint8 or t.dim() != 1:
                    return f"unexpected tensor {name!r} among its shares"
                sealed[name[len(TO) :]] = t.numpy().tobytes()
            return server.add_shares(msg.sender, sealed)

        self._collect(P.SA_SHARES, set(roster.nodes), shares, rejected, "shares")
        for recipient in sorted(server.shared):
            relayed = server.relayed(recipient)
            tensors = {
                FROM + sender: torch.frombuffer(bytearray(data), dtype=torch.uint8)
                for sender, data in relayed.items()
            }
            self._send(P.SA_RELAY, [recipient], {}, tensors=tensors)

        checked: dict[str, dict[str, str]] = {}

        def check(msg: Message) -> str | None:
            complaints = msg.body.get("rejected", {})
            if not isinstance(complaints, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in complaints.items()
            ):
                return f"malformed check: {complaints!r}"
            checked[msg.sender] = dict(complaints)
            return None

        self._collect(P.SA_CHECK, set(server.shared), check, rejected, "share checks")
        maskers = server.fix_maskers(checked)
        for culprit, why in sorted(server.complaints.items()):
            log.warning("aggregator: round %d: %s left out: %s", self.round, culprit, why)
            rejected[culprit] = f"left out of secure aggregation: {why}"
        if len(maskers) < max(3, min_clients):
            raise self._fail(
                f"{len(maskers)} client(s) got through the key exchange, at least "
                f"{max(3, min_clients)} needed; {_named(rejected)}"
            )
        self._send(P.SA_MASKERS, sorted(server.shared), {"maskers": maskers})
        log.info(
            "aggregator: round %d: secure aggregation among %s (each with %d neighbours, %d "
            "of them recover its secrets)",
            self.round,
            ", ".join(maskers),
            roster.degree,
            roster.threshold,
        )
        return maskers

    # -- step 5: the masked updates --------------------------------------------------
    def add(self, sender: str, tensors: Mapping[str, torch.Tensor], update: P.Update) -> str | None:
        """Fold in one masked update; returns why it was refused, if so."""
        try:
            self.server.add_packed(sender, tensors[MASKED], update.masked_with or [])
        except (KeyError, ValueError, SecAggError) as exc:
            return f"its masked vector does not fit: {exc}"
        return None

    # -- step 6 and the sum -------------------------------------------------------------
    def result(
        self, global_state: Mapping[str, torch.Tensor], rejected: dict[str, str]
    ) -> RoundAggregate:
        """Collect the shares that unmask the survivors' sum (from every client that
        holds some, survivor or not), unmask it, make the round's aggregate.

        Raises:
            RoundFailedError: a secret could not be recovered (too many dropouts).
        """
        server = self.server
        survivors = server.survivors
        self._send(P.SA_UNMASK, server.helpers, {"survivors": survivors})

        def reveal(msg: Message) -> str | None:
            try:
                return server.add_reveal(msg.sender, Reveal.from_body(msg.body))
            except ValueError as exc:
                return f"malformed shares: {exc}"

        waiting = set(server.helpers)
        reveals: dict[str, str] = {}
        deadline = time.monotonic() + self.settings.timeout
        # Unmask as soon as every secret has enough shares; if some were wrong, wait for
        # the survivors that have not answered yet, until the step's timeout.
        self._collect(
            P.SA_REVEAL, waiting, reveal, reveals, "shares to unmask", deadline, server.can_finish
        )
        while True:
            try:
                total = server.unmask()
                break
            except SecAggError as exc:
                if not waiting or time.monotonic() >= deadline:
                    raise self._fail(str(exc)) from None
                self._collect(P.SA_REVEAL, waiting, reveal, reveals, "shares to unmask", deadline)
        for node, why in reveals.items():
            log.warning("aggregator: round %d: %s did not help unmask: %s", self.round, node, why)
        for culprit, why in sorted(server.bad_reveals.items()):
            log.warning("aggregator: round %d: %s %s", self.round, culprit, why)
            rejected.setdefault(culprit, why)
        deltas, extras, weight = self.layout.mean(total, len(survivors), self.spec.quantizer)
        del total
        server.release()  # the sum's buffer serves the next round
        mean = {}
        for name, delta in deltas.items():
            base = global_state[name]
            dtype = base.dtype
            if dtype.is_floating_point or dtype.is_complex:  # in the mean's own precision
                mean[name] = delta.add_(base.detach().to(delta.dtype)).to(dtype)
            else:  # integer buffers: exact in float64, then rounded
                new = delta.to(torch.float64, copy=True).add_(base.detach()).round()
                mean[name] = new.to(dtype)
        return RoundAggregate(mean, extras, len(survivors), float(weight))


def _named(rejected: Mapping[str, str]) -> str:
    if not rejected:
        return "no client was refused"
    return "; ".join(f"{k}: {v}" for k, v in sorted(rejected.items()))
