"""The maths of ECDH private set intersection: hashing IDs to X25519 points, blinding.

An ID ``x`` becomes the X25519 u-coordinate ``h(x) = SHA-256(domain, context, x)``
(any 32 bytes is a point of Curve25519 or of its twist, both of prime-order
subgroups large enough; X25519 clamps every scalar to a multiple of the cofactor).
A party blinds a point with its secret scalar ``k``: ``[k] h(x)``. Blinding
commutes, ``[a]([b] h(x)) == [b]([a] h(x))``, so two parties who blind each
other's blinded points obtain the same value for the same ID, while a single
blinded point reveals nothing about the ID to anyone without the scalar (the
decisional Diffie-Hellman assumption, with SHA-256 as a random oracle).

Points travel as ``(n, 32)`` ``uint8`` arrays. Everything here is a pure function
of its inputs except :meth:`PsiKey.generate`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from lightning_fed.errors import LightningFedError

DOMAIN = b"lightning_fed/psi/x25519/v1"
POINT_BYTES = 32
#: Points blinded per task when a process pool shares the work.
CHUNK = 20_000

IdLike = str | int | bytes


class InvalidPointError(LightningFedError, ValueError):
    """A peer sent something that is not a valid list of blinded points."""


def encode_id(value: IdLike) -> bytes:
    """The canonical bytes of an ID: UTF-8 for ``str``, decimal for ``int``, as-is for bytes.

    Raises:
        TypeError: any other type (``bool`` included: ``True`` is not the ID 1).
    """
    if isinstance(value, bool) or not isinstance(value, str | int | bytes):
        raise TypeError(
            f"an ID must be a str, an int or bytes, got {type(value).__name__} {value!r}; "
            "hint: convert IDs to strings first (every party must encode them the same way)"
        )
    if isinstance(value, bytes):
        return value
    if isinstance(value, int):
        return str(value).encode()
    return value.encode("utf-8")


def hash_ids(ids: Iterable[IdLike], context: bytes) -> np.ndarray:
    """Hash IDs to X25519 u-coordinates, domain-separated by ``context`` (e.g. the task id).

    Returns:
        A ``(n, 32)`` ``uint8`` array, one row per ID, in the given order.
    """
    prefix = hashlib.sha256(DOMAIN)
    prefix.update(len(context).to_bytes(4, "big") + context)
    rows = []
    for value in ids:
        h = prefix.copy()
        h.update(encode_id(value))
        rows.append(h.digest())
    return _as_points(b"".join(rows), len(rows))


def _as_points(data: bytes, n: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(n, POINT_BYTES).copy()


def check_points(points: object, what: str) -> np.ndarray:
    """``points`` as a ``(n, 32)`` ``uint8`` array, or :class:`InvalidPointError` saying why."""
    arr = np.asarray(points)
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != POINT_BYTES:
        raise InvalidPointError(
            f"{what}: expected an (n, {POINT_BYTES}) uint8 array of points, got "
            f"{arr.dtype} {tuple(arr.shape)}"
        )
    return arr


def _blind_bytes(scalar: bytes, data: bytes) -> bytes:
    """Blind the points packed in ``data`` with ``scalar`` (runs in worker processes too)."""
    key = X25519PrivateKey.from_private_bytes(scalar)
    out = []
    for i in range(0, len(data), POINT_BYTES):
        peer = X25519PublicKey.from_public_bytes(data[i : i + POINT_BYTES])
        try:
            out.append(key.exchange(peer))
        except ValueError:  # a low-order point: the result would be all zeros
            raise InvalidPointError(
                f"point {i // POINT_BYTES} is of low order (it cannot come from hashing an "
                "ID); the peer's list is corrupt or forged"
            ) from None
    return b"".join(out)


class PsiKey:
    """A party's secret blinding scalar for one intersection (never leaves the process).

    Args:
        scalar: 32 secret bytes; use :meth:`generate`.
    """

    def __init__(self, scalar: bytes) -> None:
        if len(scalar) != POINT_BYTES:
            raise ValueError(f"a PSI key is {POINT_BYTES} bytes, got {len(scalar)}")
        self._scalar = bytes(scalar)

    @classmethod
    def generate(cls) -> PsiKey:
        """A fresh random key."""
        raw = X25519PrivateKey.generate().private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption()
        )
        return cls(raw)

    def __repr__(self) -> str:
        return "PsiKey(<secret>)"

    def blind(self, points: np.ndarray, workers: int = 1) -> np.ndarray:
        """``[k] p`` for every row ``p`` of ``points``, in the same order.

        Args:
            points: a ``(n, 32)`` ``uint8`` array.
            workers: processes sharing the work (1: this process only).

        Raises:
            InvalidPointError: ``points`` is malformed or holds a low-order point.
        """
        arr = check_points(points, "points to blind")
        n = len(arr)
        data = arr.tobytes()
        if workers <= 1 or n <= CHUNK:
            return _as_points(_blind_bytes(self._scalar, data), n)
        step = CHUNK * POINT_BYTES
        chunks = [data[i : i + step] for i in range(0, len(data), step)]
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            parts = list(pool.map(_blind_bytes, [self._scalar] * len(chunks), chunks))
        return _as_points(b"".join(parts), n)


def default_workers() -> int:
    """Processes for blinding: the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def point_set(points: np.ndarray) -> set[bytes]:
    """The rows of ``points`` as a set of 32-byte strings."""
    data = check_points(points, "points").tobytes()
    return {data[i : i + POINT_BYTES] for i in range(0, len(data), POINT_BYTES)}


def members(points: np.ndarray, of: set[bytes]) -> np.ndarray:
    """A boolean mask: which rows of ``points`` are in ``of``."""
    data = check_points(points, "points").tobytes()
    return np.fromiter(
        (data[i : i + POINT_BYTES] in of for i in range(0, len(data), POINT_BYTES)),
        dtype=bool,
        count=len(data) // POINT_BYTES,
    )


def check_unique(ids: Sequence[IdLike]) -> None:
    """Raise ``ValueError`` naming a duplicate ID (a set has each ID once)."""
    seen: set[bytes] = set()
    for value in ids:
        key = encode_id(value)
        if key in seen:
            raise ValueError(
                f"ID {value!r} appears more than once (IDs are compared by their encoding, "
                "so 7 and '7' are the same); hint: deduplicate the IDs before the intersection"
            )
        seen.add(key)
