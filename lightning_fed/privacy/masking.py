"""Masks for secure aggregation: pseudo-random vectors expanded from 32-byte seeds.

A seed is an AES-256 key; its mask is the AES-CTR keystream read as 64-bit words,
each reduced modulo ``2**modulus_bits`` (a power of two, so the words stay uniform).
Masks are added in chunks, so neither clients nor the aggregator ever hold a whole
mask next to the vector it masks.
"""

from __future__ import annotations

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: Elements masked at a time (8 MiB of keystream).
CHUNK = 1 << 20
SEED_BYTES = 32


def add_mask(
    vector: torch.Tensor,
    seed: bytes,
    modulus_bits: int,
    *,
    subtract: bool = False,
    reduce: bool = True,
) -> torch.Tensor:
    """``vector (+|-) mask(seed)`` modulo ``2**modulus_bits``, in place; returns ``vector``.

    ``vector`` is a 1-D int64 tensor of residues. With ``reduce=False`` the result is
    left unreduced (it lies within ``2**modulus_bits`` of the input): :class:`MaskSum`
    adds many masks and reduces only as often as int64 needs.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    if vector.dtype != torch.int64 or vector.dim() != 1:
        raise ValueError(f"masks apply to 1-D int64 residues, got {vector.dtype} {vector.shape}")
    modulus = (1 << modulus_bits) - 1
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(min(CHUNK, vector.numel()) * 8)
    out = bytearray(len(zeros) + 15)  # update_into wants a block's slack
    for start in range(0, vector.numel(), CHUNK):
        part = vector[start : start + CHUNK]
        size = part.numel() * 8
        stream.update_into(zeros[:size], out)
        mask = torch.frombuffer(out, dtype=torch.int64, count=part.numel())
        mask.bitwise_and_(modulus)  # in the keystream's own buffer: no temporary
        if subtract:
            part.sub_(mask)
        else:
            part.add_(mask)
        if reduce:
            part.bitwise_and_(modulus)
    return vector


class MaskSum:
    """Adds and subtracts masks on one vector of residues, reducing it modulo
    ``2**modulus_bits`` only when int64 could otherwise overflow (one pass over the
    vector per mask saved; with a 38-bit modulus, one reduction for millions of masks).

    Args:
        vector: 1-D int64 residues in ``[0, 2**modulus_bits)``, changed in place.
        modulus_bits: the modulus, at most 62 bits.
    """

    def __init__(self, vector: torch.Tensor, modulus_bits: int) -> None:
        self.vector = vector
        self.modulus_bits = modulus_bits
        # |vector| < (pending + 1) * 2**bits must stay below 2**62.
        self.limit = max(1, 2 ** max(0, 62 - modulus_bits) - 2)
        self.pending = 0

    def add(self, seed: bytes, *, subtract: bool = False) -> None:
        if self.pending >= self.limit:
            self.reduce()
        add_mask(self.vector, seed, self.modulus_bits, subtract=subtract, reduce=False)
        self.pending += 1

    def reduce(self) -> torch.Tensor:
        """The vector, reduced to residues again."""
        self.vector.bitwise_and_((1 << self.modulus_bits) - 1)
        self.pending = 0
        return self.vector


def mask(seed: bytes, size: int, modulus_bits: int) -> torch.Tensor:
    """The mask itself (for tests and small vectors)."""
    return add_mask(torch.zeros(size, dtype=torch.int64), seed, modulus_bits)
