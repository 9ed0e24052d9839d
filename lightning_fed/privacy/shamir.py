"""Shamir secret sharing (Shamir, "How to share a secret", CACM 1979) over a prime field.

A secret of up to :data:`MAX_SECRET_BYTES` bytes is the constant term of a random
polynomial of degree ``threshold - 1`` over GF(p), p = 2**521 - 1 (a Mersenne prime);
share ``x`` is the polynomial's value at ``x`` (a small positive integer, the
holder's position). Any ``threshold`` shares give the secret back by Lagrange
interpolation at 0; fewer reveal nothing about it.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Mapping, Sequence

PRIME = 2**521 - 1
#: The longest secret that fits below :data:`PRIME` with its length-preserving encoding.
MAX_SECRET_BYTES = 64
#: Bytes of one share's value on the wire (a number below :data:`PRIME`).
SHARE_BYTES = 66


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` for the holders ``xs`` (distinct integers in ``[1, p)``).

    Raises:
        ValueError: the secret is too long, the threshold is not in ``[1, len(xs)]``,
            or the ``xs`` are not distinct positive integers.
    """
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"a secret of {len(secret)} bytes; at most {MAX_SECRET_BYTES} fit")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}] (the holders)")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError(f"share positions must be distinct integers >= 1, got {list(xs)}")
    # A leading 1 byte keeps leading zero bytes of the secret through the round trip.
    coefficients = [int.from_bytes(b"\x01" + secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in xs}


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares ``{x: value}``.

    With ``threshold`` or more correct shares the result is the secret; wrong shares
    give a different value, which :func:`combine` reports when it cannot be a secret
    made by :func:`split` (callers that need certainty check the secret, e.g. a key
    against its public half).

    Raises:
        ValueError: fewer than ``threshold`` shares, or they do not decode to a secret.
    """
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} share(s), {threshold} needed")
    value = interpolate(sorted(shares.items())[:threshold], 0)
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if not raw or raw[0] != 1 or len(raw) - 1 > MAX_SECRET_BYTES:
        raise ValueError("the shares do not combine into a secret: at least one is wrong")
    return raw[1:]


def interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """The value at ``at`` of the polynomial through ``points`` (Lagrange): the secret
    at 0, or what another holder's share must be if ``points`` are correct."""
    value = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        value = (value + yi * num * pow(den, -1, PRIME)) % PRIME
    return value


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):
        value = (value * x + c) % PRIME
    return value


def encode_share(value: int) -> bytes:
    """A share's value as :data:`SHARE_BYTES` big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    """The inverse of :func:`encode_share`.

    Raises:
        ValueError: wrong length, or not a field element.
    """
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("a share's value must be below the field's prime")
    return value


def recover(
    shares: Mapping[int, int],
    threshold: int,
    is_secret: Callable[[bytes], bool],
    tries: int = 256,
) -> tuple[bytes, list[int]]:
    """The secret from shares some of which may be wrong, and the wrong ones' positions.

    ``is_secret`` tells the true secret (e.g. its hash against a commitment). The first
    ``threshold`` shares are tried, then other subsets of that size (up to ``tries``);
    once one gives the secret, the polynomial it defines names every share that is
    not on it.

    Raises:
        ValueError: fewer than ``threshold`` shares, or no subset tried gives the secret.
    """
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} share(s), {threshold} needed")
    items = sorted(shares.items())
    rng = random.Random(0)
    for attempt in range(tries):
        subset = items[:threshold] if attempt == 0 else rng.sample(items, threshold)
        try:
            secret = combine(dict(subset), threshold)
        except ValueError:
            continue
        if is_secret(secret):
            return secret, [x for x, y in items if interpolate(subset, x) != y]
        if len(items) == threshold:
            break  # there is no other subset
    raise ValueError(
        f"no {threshold} of the {len(items)} shares combine into the secret: too many are wrong"
    )
