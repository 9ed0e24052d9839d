"""Masks for secure aggregation: pseudo-random vectors expanded from 32-byte seeds.

A seed is an AES-256 key; its mask is the AES-CTR keystream (initial counter zero) read
as 64-bit little-endian words, each reduced modulo ``2**modulus_bits`` (a power of two,
so the words stay uniform). The keystream of element ``i`` starts at counter block
``i // 2``, so any chunk of a mask can be expanded on its own: :class:`MaskSum` expands
all of a vector's masks chunk by chunk (each chunk stays in the cache while every mask
is added to it), optionally on several threads (AES and torch's arithmetic both
release the GIL), and neither clients nor the aggregator ever hold a whole mask next to
the vector it masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: Elements masked at a time (2 MiB of keystream, reused for every chunk: a fresh
#: buffer per chunk costs more in page faults than the AES); even, so a chunk starts
#: on a block.
CHUNK = 1 << 18
SEED_BYTES = 32


def _check(vector: torch.Tensor, seeds: Sequence[bytes]) -> None:
    for seed in seeds:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    if vector.dtype != torch.int64 or vector.dim() != 1 or not vector.is_contiguous():
        raise ValueError(
            f"masks apply to 1-D contiguous int64 residues, got {vector.dtype} {vector.shape}"
        )


def _headroom(modulus_bits: int) -> int:
    """How many masks (each below ``2**modulus_bits``) can be added to residues before
    int64 could overflow: ``|vector| < (k + 1) * 2**bits`` must stay below ``2**62``."""
    return max(1, (1 << max(0, 62 - modulus_bits)) - 2)


class _Keystream:
    """One thread's reusable buffers: zeros to encrypt and the keystream they become."""

    def __init__(self, elements: int) -> None:
        self.zeros = memoryview(bytes(elements * 8))
        self.out = bytearray(elements * 8 + 15)  # update_into wants a block's slack

    def mask(self, seed: bytes, start: int, count: int, modulus: int) -> torch.Tensor:
        """Elements ``start .. start + count`` of ``seed``'s mask (a view of the buffer,
        valid until the next call)."""
        stream = Cipher(algorithms.AES(seed), modes.CTR((start // 2).to_bytes(16, "big")))
        stream.encryptor().update_into(self.zeros[: count * 8], self.out)
        mask = torch.frombuffer(self.out, dtype=torch.int64, count=count)
        if not _LITTLE_ENDIAN:
            mask = mask.view(torch.uint8).view(-1, 8).flip(1).contiguous().view(torch.int64)
        return mask.bitwise_and_(modulus)  # in the keystream's own buffer: no temporary


def _mask_chunks(
    vector: torch.Tensor,
    starts: Sequence[int],
    masks: Sequence[tuple[bytes, bool]],
    modulus_bits: int,
    pending: int,
) -> None:
    """Add every ``(seed, subtract)`` mask to the chunks of ``vector`` that begin at
    ``starts`` (the vector already holds ``pending`` unreduced additions), chunk by
    chunk; leaves them reduced."""
    modulus = (1 << modulus_bits) - 1
    keystream = _Keystream(min(CHUNK, vector.numel()))
    for start in starts:
        part = vector[start : start + CHUNK]
        room = _headroom(modulus_bits) - pending
        for seed, subtract in masks:
            if room <= 0:
                part.bitwise_and_(modulus)
                room = _headroom(modulus_bits)
            mask = keystream.mask(seed, start, part.numel(), modulus)
            if subtract:
                part.sub_(mask)
            else:
                part.add_(mask)
            room -= 1
        part.bitwise_and_(modulus)


def add_masks(
    vector: torch.Tensor,
    masks: Sequence[tuple[bytes, bool]],
    modulus_bits: int,
    *,
    threads: int = 1,
    pending: int = 0,
) -> torch.Tensor:
    """``vector`` plus (or, where the flag is true, minus) the mask of every seed in
    ``masks``, modulo ``2**modulus_bits``, in place; returns ``vector``, reduced.

    Args:
        threads: chunks expanded at once (1: on the calling thread).
        pending: unreduced additions the vector already holds (see :class:`MaskSum`).
    """
    _check(vector, [seed for seed, _ in masks])
    starts = range(0, vector.numel(), CHUNK)
    workers = max(1, min(threads, len(starts)))
    if workers == 1:
        _mask_chunks(vector, starts, masks, modulus_bits, pending)
    else:  # each thread its own interleaved chunks and buffers
        with ThreadPoolExecutor(workers, "secagg-mask") as pool:
            runs = [
                pool.submit(_mask_chunks, vector, starts[w::workers], masks, modulus_bits, pending)
                for w in range(workers)
            ]
            for done in runs:
                done.result()
    return vector


def add_mask(
    vector: torch.Tensor,
    seed: bytes,
    modulus_bits: int,
    *,
    subtract: bool = False,
) -> torch.Tensor:
    """``vector (+|-) mask(seed)`` modulo ``2**modulus_bits``, in place; returns
    ``vector`` (1-D int64 residues)."""
    return add_masks(vector, [(seed, subtract)], modulus_bits)


class MaskSum:
    """Adds and subtracts masks and expanded vectors on one vector of residues, modulo
    ``2**modulus_bits``. Seeds are collected and expanded together at :meth:`reduce`
    (chunk by chunk, on ``threads`` threads); vectors are added at once and the sum
    reduced only when int64 could otherwise overflow.

    Args:
        vector: 1-D int64 residues in ``[0, 2**modulus_bits)`` (or ``pending`` sums of
            them), changed in place.
        modulus_bits: the modulus, at most 62 bits.
        threads: threads that expand the masks (the aggregator uses its cores; a client
            expanding masks while it trains, one).
        pending: unreduced additions ``vector`` already holds (0: it is residues).
    """

    def __init__(
        self, vector: torch.Tensor, modulus_bits: int, threads: int = 1, pending: int = 0
    ) -> None:
        _check(vector, [])
        self.vector = vector
        self.modulus_bits = modulus_bits
        self.threads = threads
        self.limit = _headroom(modulus_bits)
        self.pending = pending
        self._masks: list[tuple[bytes, bool]] = []

    def add(self, seed: bytes, *, subtract: bool = False) -> None:
        """Add (or subtract) the mask of ``seed`` (expanded at :meth:`reduce`)."""
        _check(self.vector, [seed])
        self._masks.append((seed, subtract))

    def add_vector(self, residues: torch.Tensor) -> None:
        """Add residues already expanded, such as a sum of masks made ahead of time."""
        if self.pending >= self.limit:
            self._reduce_vector()
        self.vector.add_(residues)
        self.pending += 1

    def _reduce_vector(self) -> None:
        self.vector.bitwise_and_((1 << self.modulus_bits) - 1)
        self.pending = 0

    def reduce(self) -> torch.Tensor:
        """The vector with every mask added, reduced to residues again."""
        if self._masks:
            masks, self._masks = self._masks, []
            add_masks(
                self.vector, masks, self.modulus_bits, threads=self.threads, pending=self.pending
            )
            self.pending = 0
        elif self.pending:
            self._reduce_vector()
        return self.vector


def mask(seed: bytes, size: int, modulus_bits: int) -> torch.Tensor:
    """The mask itself (for tests and small vectors)."""
    return add_mask(torch.zeros(size, dtype=torch.int64), seed, modulus_bits)


def _little_endian() -> bool:
    import sys

    return sys.byteorder == "little"


_LITTLE_ENDIAN = _little_endian()
