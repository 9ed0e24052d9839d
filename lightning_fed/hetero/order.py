"""The same split and the same batch order on every party, from the common IDs alone.

After the intersection, every party holds the same set of IDs, each in its own
order. These pure functions turn that set into identical sequences everywhere:
a canonical order, a seeded train/test split, a per-epoch shuffle (the seed's sort
by a hash of ID and epoch), and a digest of each batch's IDs that the parties
compare before they combine anything.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import TypeVar

from lightning_fed.hetero.psi.ecdh import IdLike, encode_id

Id = TypeVar("Id", bound=str | int | bytes)

_ORDER_DOMAIN = b"lightning_fed/order/v1"
_SPLIT_DOMAIN = b"lightning_fed/split/v1"
_DIGEST_DOMAIN = b"lightning_fed/batch/v1"


def _keyed(domain: bytes, *parts: bytes) -> bytes:
    h = hashlib.sha256(domain)
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.digest()


def canonical(ids: Iterable[Id]) -> list[Id]:
    """The IDs sorted by their encoding: the same list on every party."""
    return sorted(ids, key=encode_id)


def split_ids(ids: Iterable[Id], test_fraction: float, seed: int = 0) -> tuple[list[Id], list[Id]]:
    """A seeded train/test split that every party computes identically.

    Each ID's side is fixed by a hash of the seed and the ID, then the exact number
    ``ceil(test_fraction * n)`` of IDs with the smallest hashes go to the test set;
    both lists come back in canonical order.

    Raises:
        ValueError: ``test_fraction`` outside [0, 1).
    """
    if not isinstance(test_fraction, int | float) or not 0 <= test_fraction < 1:
        raise ValueError(
            f"test_fraction must be in [0, 1), got {test_fraction!r}; it is the share of the "
            "common IDs held out for testing"
        )
    pool = canonical(ids)
    salt = str(seed).encode()
    ranked = sorted(pool, key=lambda i: _keyed(_SPLIT_DOMAIN, salt, encode_id(i)))
    n_test = math.ceil(test_fraction * len(pool))
    test = set(map(encode_id, ranked[:n_test]))
    return [i for i in pool if encode_id(i) not in test], [i for i in pool if encode_id(i) in test]


def epoch_order(ids: Iterable[Id], epoch: int, seed: int = 0) -> list[Id]:
    """The IDs shuffled for ``epoch``: sorted by a hash of the seed, the epoch and the ID."""
    salt = f"{seed}:{epoch}".encode()
    return sorted(ids, key=lambda i: _keyed(_ORDER_DOMAIN, salt, encode_id(i)))


def batches(ids: Sequence[Id], batch_size: int) -> list[list[Id]]:
    """Consecutive batches of ``batch_size`` IDs (the last may be shorter)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return [list(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]


def batch_digest(ids: Iterable[IdLike]) -> str:
    """A short hex digest of a batch's IDs, in order, to compare across parties.

    The digest is an unkeyed hash: where IDs are guessable (say, numbers up to a
    million), anyone who can read the channel's storage can test guesses of a batch.
    The features and gradients that travel with it say more, so keep the storage
    private either way (see docs/channel.md, security).
    """
    return _keyed(_DIGEST_DOMAIN, *(encode_id(i) for i in ids)).hex()[:32]
