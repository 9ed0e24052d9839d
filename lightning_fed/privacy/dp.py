"""Differential privacy's maths as pure functions: clipping, Gaussian noise, adaptive clipping.

An update is a client's change to the global model, a mapping of named tensors read
as one vector. The Gaussian mechanism bounds each update's L2 norm by ``clip`` and
adds noise of standard deviation ``noise_multiplier * clip`` to their sum (McMahan et
al., ICLR 2018), so one client's presence changes the sum's distribution by a
bounded amount whatever its data. Adaptive clipping (Andrew et al., NeurIPS 2021)
moves ``clip`` towards a quantile of the updates' norms, learned from a noised count
of the clients whose update was not clipped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, MutableMapping

import torch

Tensors = Mapping[str, torch.Tensor]


def l2_norm(tensors: Tensors) -> float:
    """The L2 norm of all ``tensors`` read as one vector (accumulated in float64)."""
    total = 0.0
    for t in tensors.values():
        total += float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2
    return math.sqrt(total)


def clip_factor(norm: float, clip: float) -> float:
    """What an update of L2 norm ``norm`` is multiplied by to bound its norm by ``clip``."""
    if not (math.isfinite(norm) and norm >= 0):
        raise ValueError(f"an update's norm must be finite and >= 0, got {norm!r}")
    return 1.0 if norm <= clip else clip / norm


def clip_(tensors: MutableMapping[str, torch.Tensor], clip: float) -> float:
    """Scale ``tensors`` in place so that their joint L2 norm is at most ``clip``.

    Returns:
        the norm before clipping.
    """
    norm = l2_norm(tensors)
    factor = clip_factor(norm, clip)
    if factor < 1.0:
        for t in tensors.values():
            t.mul_(factor)
    return norm


def noise_generator(
    seed: int | None = None, device: torch.device | str | None = None
) -> torch.Generator:
    """A generator for noise on ``device`` (CPU by default): seeded from ``os.urandom``
    unless a seed is given (tests). Never torch's global generator: parties that seed
    alike (``seed_everything(42)`` in one shared script) would draw the same noise,
    and anyone who knows the seed could subtract it."""
    g = torch.Generator(device=device or "cpu")
    g.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
    return g


def add_noise_(
    tensors: MutableMapping[str, torch.Tensor], std: float, generator: torch.Generator
) -> None:
    """Add independent Gaussian noise of standard deviation ``std`` to every element, in place.

    Raises:
        ValueError: ``std`` is negative or not finite, or a tensor is not floating point.
    """
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"the noise's standard deviation must be finite and >= 0, got {std!r}")
    if std == 0:
        return
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{name}: noise goes on floating-point tensors, not {t.dtype}")
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
        t.add_(noise.to(t.dtype), alpha=std)


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The updates' share of ``noise_multiplier`` when adaptive clipping also noises a count.

    The clipped count's noise (standard deviation ``count_stddev``, on indicators of
    sensitivity 1/2) spends part of the budget; Andrew et al.'s Theorem 1 leaves the
    updates ``(z**-2 - (2 * count_stddev)**-2) ** -0.5``, so the pair is exactly as
    private as one Gaussian mechanism with multiplier ``z``.

    Raises:
        ValueError: ``count_stddev`` is too small for ``noise_multiplier`` to cover both.
    """
    if noise_multiplier == 0:
        return 0.0
    rest = noise_multiplier**-2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(
            f"the clipped count's noise (stddev {count_stddev:g}) must exceed half the noise "
            f"multiplier ({noise_multiplier:g} / 2) for the updates to keep any noise budget"
        )
    return float(rest**-0.5)


def next_clip(clip: float, unclipped_fraction: float, target_quantile: float, rate: float) -> float:
    """Adaptive clipping's geometric step: ``clip * exp(-rate * (fraction - quantile))``.

    ``unclipped_fraction`` is the (noised) fraction of updates whose norm was at most
    ``clip``; when more than ``target_quantile`` of them fit, the bound shrinks.
    """
    return float(clip * math.exp(-rate * (unclipped_fraction - target_quantile)))
