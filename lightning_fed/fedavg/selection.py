"""Which tensors are federated, and which clients take part in a round (pure functions)."""

from __future__ import annotations

import fnmatch
import math
import random
from collections.abc import Collection, Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

#: ``local_keys`` patterns that keep BatchNorm's running statistics on each party
#: (the FedBN recipe): ``FedAvgStrategy(local_keys=BATCHNORM_STATS)``.
BATCHNORM_STATS: tuple[str, ...] = ("*running_mean", "*running_var", "*num_batches_tracked")


def federated_names(names: Iterable[str], local_keys: Collection[str]) -> list[str]:
    """The state-dict names that are averaged: all but those matching a ``local_keys`` glob."""
    return [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in local_keys)]


def select(state: Mapping[str, T], names: Collection[str]) -> dict[str, T]:
    """The entries of ``state`` named in ``names``, in ``state``'s order."""
    return {k: v for k, v in state.items() if k in names}


def participants_per_round(per_round: int | float | None, available: int) -> int:
    """How many of ``available`` clients a round samples.

    ``None`` means all; an int is a count (capped at ``available``); a float in
    (0, 1] is a fraction, rounded up so that at least one client is chosen.
    """
    if per_round is None:
        return available
    if isinstance(per_round, bool):
        raise ValueError(f"clients_per_round must be an int, a float or None, got {per_round!r}")
    if isinstance(per_round, int):
        if per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {per_round}")
        return min(per_round, available)
    if isinstance(per_round, float) and 0 < per_round <= 1:
        return min(available, max(1, math.ceil(round(per_round * available, 9))))
    raise ValueError(
        f"clients_per_round must be an int >= 1, a fraction in (0, 1] or None, got {per_round!r}"
    )


def sample_clients(
    clients: Collection[str], per_round: int | float | None, *, seed: int, round: int
) -> list[str]:
    """The clients of one round, drawn reproducibly from ``(seed, round)`` (sorted)."""
    pool = sorted(clients)
    k = participants_per_round(per_round, len(pool))
    if k >= len(pool):
        return pool
    return sorted(random.Random(f"{seed}:{round}").sample(pool, k))
