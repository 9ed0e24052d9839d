"""What a user sets to get secure aggregation, and what a round tells the clients about it."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lightning_fed.errors import SettingError
from lightning_fed.privacy.quantize import MAX_MODULUS_BITS, Quantizer, modulus_bits


class SecureAggregation:
    """SecAgg+ for FedAvg: the aggregator learns only the sum of the round's updates.

    Set it on the aggregator (``FedAvgStrategy(..., secure_aggregation=SecureAggregation())``);
    clients learn it from each round. Set on a client, it is that client's requirement:
    it refuses to send its update in a round that is not secure, or whose threshold is
    lower than its own.

    Each client sends its change to the global model, clipped to ``[-clip, clip]`` per
    coordinate and rounded to ``2**bits`` levels, multiplied by its sample count, and
    masked; the dequantised mean differs from plain FedAvg's by at most
    ``clip / (2**bits - 1)`` per coordinate (more where a change exceeds ``clip``, which
    is clipped). See docs/privacy.md for the protocol and its threat model.

    Args:
        clip: the largest change of one coordinate a client's update keeps.
        bits: quantisation levels per coordinate, as a power of two (2 to 32).
        max_samples: the largest sample count a client may weigh its update by; with
            ``bits`` and the round's clients it sets the modulus (at most 62 bits).
        degree: how many neighbours each client masks with and shares its secrets
            among (None: every other client up to 16 clients, then about
            ``4 log2(clients)``, as SecAgg+ prescribes).
        threshold: the fraction of a client's neighbours whose shares recover its
            secrets (more than this fraction is needed); the aggregator must collude
            with that many to unmask one client, and up to the rest may drop out.
            At least 0.5.
        timeout: seconds the aggregator waits at each key-exchange step for the
            round's clients (a client that does not answer in time counts as dropped).
    """

    def __init__(
        self,
        clip: float = 1.0,
        bits: int = 16,
        max_samples: int = 2**20,
        degree: int | None = None,
        threshold: float = 0.5,
        timeout: float = 60.0,
    ) -> None:
        try:
            Quantizer(clip, bits)
        except (TypeError, ValueError) as exc:
            raise SettingError(f"SecureAggregation: {exc}") from None
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise SettingError(
                f"SecureAggregation: max_samples must be an int >= 1, got {max_samples!r}"
            )
        if degree is not None and (
            isinstance(degree, bool) or not isinstance(degree, int) or degree < 2
        ):
            raise SettingError(
                f"SecureAggregation: degree must be None or an int >= 2, got {degree!r}"
            )
        if not isinstance(threshold, int | float) or not 0.5 <= threshold < 1:
            raise SettingError(
                f"SecureAggregation: threshold must be in [0.5, 1), got {threshold!r}; hint: "
                "below half, an aggregator could recover a client's secrets from a minority"
            )
        if not isinstance(timeout, int | float) or not (math.isfinite(timeout) and timeout > 0):
            raise SettingError(f"SecureAggregation: timeout must be seconds > 0, got {timeout!r}")
        self.clip = float(clip)
        self.bits = bits
        self.max_samples = max_samples
        self.degree = degree
        self.threshold = float(threshold)
        self.timeout = float(timeout)

    def __repr__(self) -> str:
        return (
            f"SecureAggregation(clip={self.clip:g}, bits={self.bits}, "
            f"max_samples={self.max_samples}, degree={self.degree}, "
            f"threshold={self.threshold:g}, timeout={self.timeout:g})"
        )

    def check_clients(self, clients: int) -> int:
        """The modulus (bits) for up to ``clients`` clients per round.

        Raises:
            SettingError: it would not fit in :data:`MAX_MODULUS_BITS`.
        """
        try:
            return modulus_bits(self.bits, clients * self.max_samples)
        except ValueError as exc:
            raise SettingError(
                f"SecureAggregation with {clients} clients per round: {exc}"
            ) from None

    def for_round(self, clients: int) -> SecureRound:
        """The parameters a round with ``clients`` clients announces."""
        return SecureRound(
            clip=self.clip,
            bits=self.bits,
            max_samples=self.max_samples,
            modulus_bits=self.check_clients(clients),
            threshold=self.threshold,
            seed=os.urandom(16).hex(),
            timeout=self.timeout,
        )


@dataclass(frozen=True)
class SecureRound:
    """What a round message says about its secure aggregation (``secure`` in its body)."""

    clip: float
    bits: int
    max_samples: int
    modulus_bits: int
    threshold: float
    seed: str
    timeout: float

    @property
    def quantizer(self) -> Quantizer:
        return Quantizer(self.clip, self.bits)

    @property
    def packed_width(self) -> int:
        """Bytes per element of a masked vector on the wire."""
        return (self.modulus_bits + 7) // 8

    def to_body(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> SecureRound:
        """Raises ValueError naming the field that does not fit."""
        try:
            out = cls(
                clip=float(body["clip"]),
                bits=int(body["bits"]),
                max_samples=int(body["max_samples"]),
                modulus_bits=int(body["modulus_bits"]),
                threshold=float(body["threshold"]),
                seed=str(body["seed"]),
                timeout=float(body["timeout"]),
            )
            out.quantizer  # noqa: B018 - checks clip and bits
            bytes.fromhex(out.seed)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"secure aggregation settings {dict(body)!r} do not fit: {exc}"
            ) from None
        if (
            not 0 < out.modulus_bits <= MAX_MODULUS_BITS
            or not 0.5 <= out.threshold < 1
            or not (math.isfinite(out.timeout) and out.timeout > 0)
        ):
            raise ValueError(f"secure aggregation settings {dict(body)!r} are out of range")
        return out
