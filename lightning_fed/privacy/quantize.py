"""Fixed-point quantisation for secure aggregation: floats to integers that sum exactly.

A client's update is clipped to ``[-clip, clip]`` per coordinate and mapped to one of
``2**bits`` levels; the aggregator sums weighted levels modulo ``2**modulus_bits``
and maps the sum back. :func:`modulus_bits` picks a modulus that the largest possible
sum cannot reach, so the modular sum is the true sum: overflow is impossible by
construction, not checked after the fact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lightning_fed.privacy.buffers import zeros

#: The widest modulus whose sums stay exact in int64 (two values below 2**62 add
#: without overflow).
MAX_MODULUS_BITS = 62


@dataclass(frozen=True)
class Quantizer:
    """Clip to ``[-clip, clip]`` and round to ``2**bits`` evenly spaced levels.

    Attributes:
        clip: the largest magnitude a coordinate keeps; larger ones are clipped.
        bits: levels per coordinate, as a power of two.
    """

    clip: float
    bits: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a finite number > 0, got {self.clip!r}")
        if not 2 <= self.bits <= 32:
            raise ValueError(f"bits must be in [2, 32], got {self.bits!r}")

    @property
    def levels(self) -> int:
        return int(2**self.bits)

    @property
    def step(self) -> float:
        """The distance between two levels."""
        return 2 * self.clip / (self.levels - 1)

    @property
    def error_bound(self) -> float:
        """The largest difference between a weighted mean of unclipped coordinates and
        its dequantised secure sum: half a step (rounding to the nearest level)."""
        return self.step / 2

    def quantize(self, values: torch.Tensor) -> torch.Tensor:
        """Levels in ``[0, 2**bits - 1]`` as int64 (values clipped first)."""
        return self.levels_of(values).to(torch.int64)

    def levels_of(self, values: torch.Tensor) -> torch.Tensor:
        """:meth:`quantize`'s levels as whole float64 numbers (copy them into an int64
        tensor to skip a temporary)."""
        # In place on one float64 copy: each new 8-byte-per-element temporary costs as
        # much as the arithmetic on a large model.
        scaled = values.detach().to(torch.float64, copy=True).clamp_(-self.clip, self.clip)
        # (x + clip) / step in one pass: clip / step + x * (1 / step); x in [-clip, clip]
        # lands in [0, levels - 1] up to rounding, which round() absorbs.
        inverse = 1.0 / self.step
        offset = torch.tensor(self.clip * inverse, dtype=torch.float64)
        torch.add(offset, scaled, alpha=inverse, out=scaled)
        return scaled.round_().clamp_(0, self.levels - 1)

    def dequantize_mean(self, level_sum: torch.Tensor, weight: float) -> torch.Tensor:
        """The weighted mean of the quantised values from ``sum(w_i * level_i)`` and
        ``sum(w_i)`` (float64)."""
        return level_sum.to(torch.float64, copy=True).mul_(self.step / weight).sub_(self.clip)


def modulus_bits(bits: int, max_total_weight: int) -> int:
    """The modulus (in bits) that no sum of up to ``max_total_weight`` weighted levels
    of ``bits`` bits can reach: ``bits + ceil(log2(max_total_weight + 1))``.

    Raises:
        ValueError: it would exceed :data:`MAX_MODULUS_BITS`.
    """
    if max_total_weight < 1:
        raise ValueError(f"max_total_weight must be >= 1, got {max_total_weight!r}")
    need = bits + math.ceil(math.log2(max_total_weight + 1))
    if need > MAX_MODULUS_BITS:
        raise ValueError(
            f"{bits} bits per coordinate with weights summing to up to {max_total_weight} "
            f"need a {need}-bit modulus; at most {MAX_MODULUS_BITS} bits are exact; hint: "
            "lower bits, or max_samples (the largest sample count a client may claim)"
        )
    return need


#: Residues packed at a time: a chunk's source and bytes stay in the cache across the
#: passes (about a fifth faster than whole-vector passes on a large model).
PACK_CHUNK = 1 << 16


def pack(values: torch.Tensor, modulus_bits: int, *, in_place: bool = False) -> torch.Tensor:
    """Residues (int64, each below ``2**modulus_bits``) as ``ceil(modulus_bits/8)``
    little-endian bytes each: a uint8 tensor, the form they travel in.

    Each value is written as a whole little-endian int64 at its element's byte offset;
    its high bytes (zero in a residue) fall on the next elements' bytes, so the writes
    are OR-ed into zeroed bytes in passes that never overlap (one pass over strided
    memory instead of a byte-wise gather: about three times faster on a large model),
    chunk by chunk.

    Args:
        in_place: pack into ``values``' own memory (a contiguous 1-D int64 tensor,
            overwritten) and return a view of its first bytes: no second buffer. An
            element's bytes never land past its own int64, so each chunk, copied
            aside first, only overwrites elements already packed.
    """
    width = (modulus_bits + 7) // 8
    if in_place:
        if values.dtype != torch.int64 or values.dim() != 1 or not values.is_contiguous():
            raise ValueError(
                f"packing in place needs a contiguous 1-D int64 tensor, got {values.dtype} "
                f"of shape {tuple(values.shape)}"
            )
        flat = values.detach()
    else:
        flat = values.detach().to(torch.int64).contiguous().view(-1)
    n = flat.numel()
    out = flat.view(torch.uint8)[: n * width] if in_place else zeros(n * width, torch.uint8)
    source, raw = flat.numpy(), out.numpy()
    aside = np.empty(min(PACK_CHUNK, n), dtype=np.int64) if in_place else None
    head = _whole_windows(n, width)
    passes = -(-8 // width)  # elements one 8-byte window touches
    for start in range(0, head, PACK_CHUNK):
        stop = min(head, start + PACK_CHUNK)
        chunk = source[start:stop]
        if aside is not None:
            chunk = aside[: stop - start]
            np.copyto(chunk, source[start:stop])
            raw[start * width : stop * width] = 0
        windows = np.ndarray(
            (stop - start,), dtype="<i8", buffer=raw, offset=start * width, strides=(width,)
        )
        for r in range(passes):
            part = windows[r::passes]
            np.bitwise_or(part, chunk[r::passes], out=part)
    tail = source[head:].astype("<i8").view(np.uint8).reshape(-1, 8)[:, :width].copy()
    raw[head * width :] = tail.reshape(-1)
    return out


def unpack(data: torch.Tensor, modulus_bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of :func:`pack` (:func:`add_packed` into zeros, reduced).

    Args:
        out: an int64 tensor of the right size to unpack into; one that does not fit is
            left alone and a new tensor returned.

    Raises:
        ValueError: ``data`` is not whole elements of the packed width.
    """
    n = _packed_count(data, modulus_bits)
    fits = (
        out is not None
        and out.dtype == torch.int64
        and tuple(out.shape) == (n,)
        and out.is_contiguous()
    )
    result = out.zero_() if fits and out is not None else torch.zeros(n, dtype=torch.int64)
    add_packed(result, data, modulus_bits)
    return result.bitwise_and_((1 << modulus_bits) - 1)


def add_packed(total: torch.Tensor, data: torch.Tensor, modulus_bits: int) -> None:
    """``total += unpack(data)`` in one pass, modulo ``2**64``: each element's 8-byte
    window is added whole; the next elements' bytes in it (and any bits a sender set
    above the modulus) are multiples of ``2**modulus_bits``, so they vanish when the
    total is reduced (``bitwise_and`` with ``2**modulus_bits - 1``) before it is read.
    Unsigned arithmetic: the wrap-around is defined.

    Raises:
        ValueError: ``data`` is not whole elements of the packed width or ``total``
            is not a contiguous int64 vector of as many.
    """
    n = _packed_count(data, modulus_bits)
    if total.dtype != torch.int64 or tuple(total.shape) != (n,) or not total.is_contiguous():
        raise ValueError(
            f"{n} packed residues cannot be added to {total.dtype} of shape {tuple(total.shape)}"
        )
    width = (modulus_bits + 7) // 8
    raw = data.detach().contiguous().numpy()
    target = total.numpy().view(np.uint64)
    head = _whole_windows(n, width)
    if head:
        windows = np.ndarray((head,), dtype="<u8", buffer=raw, strides=(width,))
        np.add(target[:head], windows, out=target[:head])
    if head < n:
        tail = np.zeros((n - head, 8), dtype=np.uint8)
        tail[:, :width] = raw[head * width :].reshape(-1, width)
        np.add(target[head:], tail.view("<u8").reshape(-1), out=target[head:])


def _packed_count(data: torch.Tensor, modulus_bits: int) -> int:
    """How many residues ``data`` packs. Raises ValueError if not whole ones."""
    width = (modulus_bits + 7) // 8
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() % width:
        raise ValueError(
            f"packed residues are a 1-D uint8 tensor of a multiple of {width} bytes, got "
            f"{data.dtype} of shape {tuple(data.shape)}"
        )
    return data.numel() // width


def _whole_windows(n: int, width: int) -> int:
    """How many of ``n`` packed elements of ``width`` bytes have all 8 bytes from their
    offset inside the buffer (the rest are read and written one by one)."""
    return max(0, n - (-(-8 // width)) + 1) if width < 8 else n
