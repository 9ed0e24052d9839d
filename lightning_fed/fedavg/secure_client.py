"""A client's secure round: SecAgg+'s steps over the channel, beside and after training.

:meth:`SecureRoundClient.prepare` runs while the client trains, on a thread (keys,
shares, the check of the shares received); :meth:`SecureRoundClient.upload` after
training sends the client's change to the round's global model, quantised, weighted by
its sample count and masked, then its shares of the neighbours' secrets once the
aggregator names the survivors. Only rank 0 of a DDP client runs these (through
:class:`~lightning_fed.fedavg.client_link.ClientLink`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import torch

from lightning_fed.fedavg import protocol as P
from lightning_fed.fedavg.client import ClientRole
from lightning_fed.fedavg.errors import FedAvgError
from lightning_fed.fedavg.secure_aggregator import FROM, MASKED, TO, round_context
from lightning_fed.privacy.buffers import RECYCLED
from lightning_fed.privacy.errors import SecAggError
from lightning_fed.privacy.quantize import pack
from lightning_fed.privacy.secagg import Roster, SecAggClient
from lightning_fed.privacy.settings import SecureAggregation, SecureRound
from lightning_fed.privacy.vector import Layout

log = logging.getLogger(__name__)

#: Seconds a client allows the aggregator per key-exchange step on top of the
#: aggregator's own step timeout (its wait for the slowest client).
STEP_MARGIN = 30.0


def secure_round_of(
    start: P.RoundStart, requirement: SecureAggregation | None, node: str
) -> SecureRound | None:
    """The round's secure-aggregation settings, checked against this client's requirement.

    Raises:
        FedAvgError: the round is not secure though this client requires it, its
            settings are malformed, or its threshold is below this client's.
    """
    if start.secure is None:
        if requirement is not None:
            raise FedAvgError(
                f"client {node!r} requires secure aggregation, but the aggregator's round "
                "is plain FedAvg, where it would see this client's update; hint: set "
                "secure_aggregation on the aggregator too"
            )
        return None
    try:
        spec = SecureRound.parse(start.secure)
    except ValueError as exc:
        raise FedAvgError(f"client {node!r}: {exc}") from None
    if requirement is not None and spec.threshold < requirement.threshold:
        raise FedAvgError(
            f"client {node!r} requires a secure-aggregation threshold of at least "
            f"{requirement.threshold:g}, the aggregator's round has {spec.threshold:g}"
        )
    return spec


class SecureRoundClient:
    """One secure round on a client (rank 0)."""

    def __init__(self, role: ClientRole, spec: SecureRound, round: int, attempt: str) -> None:
        self.role = role
        self.spec = spec
        self.node = role.channel.node_id
        channel = role.channel
        self.client = SecAggClient(
            self.node,
            round_context(channel.task.task_id, round, attempt),
            sign=channel.identity.sign,
            verify=channel.task.verify,
        )
        self.step_timeout = spec.timeout + STEP_MARGIN
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    # -- before training ----------------------------------------------------------------
    def start(self) -> None:
        """Run :meth:`prepare` on a thread, while the client trains (it needs no more than
        the channel, which training does not use); :meth:`upload` waits for it."""
        self._thread = threading.Thread(
            target=self._prepare_in_thread, name=f"secagg-{self.node}", daemon=True
        )
        self._thread.start()

    def _prepare_in_thread(self) -> None:
        try:
            self.prepare()
        except BaseException as exc:  # handed to upload(), on the training thread
            self._failure = exc

    def _prepared(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def prepare(self) -> None:
        """Steps 1, 3 and 4: keys out, shares out (then the masks expanded ahead of step 5),
        shares in and checked.

        Raises:
            RoundAbandonedError: the aggregator went on without this client.
        """
        role = self.role
        role.send_step(P.SA_KEYS, self.client.advertise().to_body())
        msg = role.await_step(P.SA_ROSTER, self.step_timeout)
        try:
            roster = Roster.from_body(msg.body)
            sealed = self.client.share(roster, self.spec.threshold)
        except ValueError as exc:
            raise FedAvgError(f"client {self.node!r}: the aggregator's roster: {exc}") from None
        except SecAggError as exc:
            raise FedAvgError(str(exc)) from None
        tensors = {
            TO + j: torch.frombuffer(bytearray(d), dtype=torch.uint8) for j, d in sealed.items()
        }
        role.send_step(P.SA_SHARES, {}, tensors)
        self.client.premask(self.spec.modulus_bits)  # while the others share and train
        msg = role.await_step(P.SA_RELAY, self.step_timeout)
        relayed = {
            name[len(FROM) :]: t.numpy().tobytes()
            for name, t in msg.tensors.items()
            if name.startswith(FROM) and t.dtype == torch.uint8 and t.dim() == 1
        }
        problems = self.client.receive_shares(relayed)
        for sender, why in sorted(problems.items()):
            log.warning("client %s: the share from %s is refused: %s", self.node, sender, why)
        role.send_step(P.SA_CHECK, {"rejected": problems})

    # -- after training -------------------------------------------------------------------
    def upload(
        self,
        deltas: Mapping[str, torch.Tensor],
        extras: Mapping[str, torch.Tensor],
        num_samples: int,
        metrics: Mapping[str, float],
        evaluation: dict[str, Any] | None,
        states: Mapping[str, torch.Tensor],
    ) -> None:
        """Step 5 (the masked update) and step 6 (shares of the neighbours' secrets).

        Raises:
            RoundAbandonedError: the aggregator went on without this client.
            FedAvgError: the sample count exceeds ``max_samples``.
        """
        self._prepared()
        spec = self.spec
        if num_samples > spec.max_samples:
            raise FedAvgError(
                f"client {self.node!r} trained on {num_samples} samples, above secure "
                f"aggregation's max_samples={spec.max_samples}; hint: raise max_samples on "
                "the aggregator"
            )
        msg = self.role.await_step(P.SA_MASKERS, self.step_timeout)
        maskers = msg.body.get("maskers")
        if not isinstance(maskers, list) or not all(isinstance(m, str) for m in maskers):
            raise FedAvgError(f"client {self.node!r}: malformed list of maskers {maskers!r}")
        if self.node in maskers:
            self._send_masked(deltas, extras, num_samples, maskers, metrics, evaluation, states)
        else:
            log.warning(
                "client %s: left out of this round's secure aggregation; its update is not "
                "sent, but it still helps unmask the others' sum",
                self.node,
            )
        msg = self.role.await_step(P.SA_UNMASK, self.role.instruction_timeout)
        survivors = msg.body.get("survivors")
        if not isinstance(survivors, list) or not all(isinstance(m, str) for m in survivors):
            raise FedAvgError(f"client {self.node!r}: malformed list of survivors {survivors!r}")
        try:
            reveal = self.client.reveal(survivors)
        except SecAggError as exc:
            raise FedAvgError(str(exc)) from None
        self.role.send_step(P.SA_REVEAL, reveal.to_body())

    def _send_masked(
        self,
        deltas: Mapping[str, torch.Tensor],
        extras: Mapping[str, torch.Tensor],
        num_samples: int,
        maskers: list[str],
        metrics: Mapping[str, float],
        evaluation: dict[str, Any] | None,
        states: Mapping[str, torch.Tensor],
    ) -> None:
        spec = self.spec
        layout = Layout.of(
            {n: _spec(t) for n, t in deltas.items()}, {n: _spec(t) for n, t in extras.items()}
        )
        clipped = sum(_beyond(t, spec.clip) for t in deltas.values())
        if clipped:
            log.warning(
                "client %s: %d of %d changes exceed secure aggregation's clip=%g and are "
                "clipped; hint: raise clip on the aggregator",
                self.node,
                clipped,
                layout.weighted_size,
                spec.clip,
            )

        def encode(base: torch.Tensor | None) -> torch.Tensor:
            return layout.encode(deltas, extras, num_samples, spec.quantizer, add_to=base)

        masked = self.client.mask_update(encode, layout.size, maskers, spec.modulus_bits)
        tensors = {MASKED: pack(masked, spec.modulus_bits, in_place=True), **states}
        self.role.upload(tensors, 1, metrics, evaluation, self.client.masked_with)
        del tensors  # sent (written and hashed): its memory serves the next round's masks
        RECYCLED.give(masked)


def _beyond(t: torch.Tensor, clip: float) -> int:
    """How many elements of ``t`` exceed ``clip`` in magnitude (one pass, no temporary,
    in the common case where none does)."""
    if t.numel() == 0:
        return 0
    low, high = torch.aminmax(t.detach())
    if float(low) >= -clip and float(high) <= clip:
        return 0
    return int((t.abs() > clip).sum())


def _spec(t: torch.Tensor) -> Any:
    from lightning_fed.algorithms.aggregate import TensorSpec

    return TensorSpec.of(t)
