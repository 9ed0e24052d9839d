"""The secure interactive layer's arithmetic on each side (no channel, no Lightning).

One collaborator's projection has the true weight ``W + ε_acc``: the host holds ``W``
(:class:`HostLayer`), the collaborator ``ε_acc`` (:class:`CollaboratorLayer`);
neither knows the sum. Per training batch (α: the collaborator's features, δ: the
host's gradient of the projected features, η: ``project_layer_lr``):

1. collaborator: ``[α]`` and ``[ε_acc]`` (encrypted with its secret key);
2. host: ``[α W + ε_B]`` with a fresh noise tensor ε_B;
3. collaborator: decrypts, adds ``α ε_acc``: ``α (W + ε_acc) + ε_B``;
4. host: removes ε_B: ``z = α (W + ε_acc)``; after its backward pass, sends
   ``[αᵀ δ + ε_h]`` (fresh noise ε_h) and ``[δ (W + ε_acc)ᵀ]`` (from ``[ε_acc]``);
5. collaborator: decrypts both; returns ``αᵀ δ + ε_h + ε_A / η`` (fresh ε_A), backs
   ``δ (W + ε_acc)ᵀ`` into its feature model, then ``ε_acc += ε_A``;
6. host: ``W -= η (αᵀ δ + ε_A / η)``, so ``W + ε_acc`` took the SGD step
   ``-η αᵀ δ`` while each share moved by noise the other cannot tell apart.

Noise is uniform in ``[-noise_scale, noise_scale]`` from the operating system's
entropy, not from torch's generator, so seeding and dropout masks are unaffected.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from lightning_fed.hetero.secure.ckks import CKKSEvaluator, SecretKeys
from lightning_fed.hetero.secure.packing import Layout

Matrix = NDArray[np.float64]


def _noise_source() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(128))


def initial_share(n: int, m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One party's initial share (``n × m``, float64), uniform with variance ``1 / n``.

    The two independent shares add up to a weight of variance ``2 / n`` (He
    initialisation: the projection keeps its input's scale ahead of a ReLU), while each
    share alone is random: neither party knows the true weight, even at the start.
    """
    bound = math.sqrt(3.0 / n)
    share: torch.Tensor = (
        torch.rand(n, m, dtype=torch.float64, generator=generator) * 2 - 1
    ) * bound
    return share


def own_projection(n: int, m: int) -> nn.Linear:
    """The host's plain projection of its own features: He-uniform weights, zero bias."""
    layer = nn.Linear(n, m)
    with torch.no_grad():
        bound = math.sqrt(6.0 / n)
        layer.weight.uniform_(-bound, bound)
        layer.bias.zero_()
    return layer


@dataclass
class ForwardState:
    """What the host keeps of a batch between the forward and the backward exchange."""

    features: object  # the ciphertext [α]
    noise: object | None  # the ciphertext [ε_acc] (training only)
    rows: int
    eps_b: Matrix


class HostLayer:
    """The host's share ``W`` of one collaborator's projection, and its HE products.

    Args:
        weight: ``W`` (``n × m``, float64), updated in place (a module buffer, so it
            is checkpointed).
        layout: the packing.
        evaluator: the host's public CKKS evaluator for this collaborator's keys.
        lr: η (``project_layer_lr``).
        noise_scale: the bound of the host's noise.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        layout: Layout,
        evaluator: CKKSEvaluator,
        lr: float,
        noise_scale: float,
    ) -> None:
        self.weight = weight
        self.layout = layout
        self.evaluator = evaluator
        self.lr = lr
        self.noise_scale = noise_scale
        self._rng = _noise_source()

    def _noise(self, *shape: int) -> Matrix:
        return self._rng.uniform(-self.noise_scale, self.noise_scale, size=shape)

    def forward(
        self, features: bytes, noise: bytes | None, rows: int
    ) -> tuple[bytes, ForwardState]:
        """``[α W + ε_B]`` for a batch of ``rows``; the state the backward needs."""
        ev = self.evaluator
        alpha = ev.from_bytes(features)
        ev.check_fresh(alpha, "the encrypted features")
        eps = None
        if noise is not None:
            eps = ev.from_bytes(noise)
            ev.check_fresh(eps, "the encrypted noise")
        weight = self.weight.detach().cpu().numpy()
        eps_b = self._noise(rows, self.layout.m)
        product = self.layout.forward(ev, alpha, weight)
        masked = ev.add_plain(product, self.layout.forward_output(eps_b, rows))
        return ev.to_bytes(masked), ForwardState(alpha, eps, rows, eps_b)

    @staticmethod
    def projected(reply: Matrix, state: ForwardState) -> Matrix:
        """``α (W + ε_acc)`` from the collaborator's reply ``α (W + ε_acc) + ε_B``."""
        return reply - state.eps_b

    def backward(self, state: ForwardState, delta: Matrix) -> tuple[bytes, bytes, Matrix]:
        """``[αᵀ δ + ε_h]``, ``[δ (W + ε_acc)ᵀ]`` (as its transpose), and ε_h."""
        if state.noise is None:
            raise ValueError("backward() of an evaluation batch")
        ev, layout = self.evaluator, self.layout
        weight = self.weight.detach().cpu().numpy()
        full = self._noise(ev.slots)  # every slot: the others hold partial sums
        gradient = ev.add_plain(layout.weight_gradient(ev, state.features, delta), full)
        inputs = layout.input_gradient(ev, state.noise, delta)
        inputs = ev.add_plain(inputs, layout.input_output(delta @ weight.T))
        return ev.to_bytes(gradient), ev.to_bytes(inputs), layout.read_weight(full)

    def update(self, reply: Matrix, eps_h: Matrix) -> None:
        """``W -= η (αᵀ δ + ε_A / η)`` from the reply ``αᵀ δ + ε_h + ε_A / η``."""
        step = torch.from_numpy(self.lr * (reply - eps_h)).to(self.weight)
        self.weight.sub_(step)


class CollaboratorLayer:
    """The collaborator's share ``ε_acc`` of its projection, its keys and its noise.

    Args:
        noise: ``ε_acc`` (``n × m``, float64), updated in place (a module buffer).
        layout: the packing.
        keys: the collaborator's secret CKKS keys.
        lr: η (``project_layer_lr``), the same as the host's.
        noise_scale: the bound of ε_A / η.
    """

    def __init__(
        self,
        noise: torch.Tensor,
        layout: Layout,
        keys: SecretKeys,
        lr: float,
        noise_scale: float,
    ) -> None:
        self.noise = noise
        self.layout = layout
        self.keys = keys
        self.lr = lr
        self.noise_scale = noise_scale
        self._rng = _noise_source()

    def encrypt_features(self, alpha: Matrix) -> bytes:
        return self.keys.encrypt(self.layout.encode_features(alpha))

    def encrypt_noise(self) -> bytes:
        """``[ε_acc]`` as it is now (before this batch's update)."""
        return self.keys.encrypt(self.layout.encode_noise(self.noise.detach().cpu().numpy()))

    def finish_forward(self, product: bytes, alpha: Matrix) -> Matrix:
        """``α (W + ε_acc) + ε_B`` from the host's ``[α W + ε_B]``."""
        masked = self.layout.read_forward(self.keys.decrypt(product), alpha.shape[0])
        result: Matrix = masked + alpha @ self.noise.detach().cpu().numpy()
        return result

    def finish_backward(self, gradient: bytes, inputs: bytes, rows: int) -> tuple[Matrix, Matrix]:
        """The reply ``αᵀ δ + ε_h + ε_A / η`` and the input gradient ``δ (W + ε_acc)ᵀ``;
        ``ε_acc += ε_A`` afterwards."""
        masked = self.layout.read_weight(self.keys.decrypt(gradient))
        input_gradient = self.layout.read_input(self.keys.decrypt(inputs), rows)
        shape = (self.layout.n, self.layout.m)
        eps_a_over_lr = self._rng.uniform(-self.noise_scale, self.noise_scale, size=shape)
        self.noise.add_(torch.from_numpy(eps_a_over_lr * self.lr).to(self.noise))
        return masked + eps_a_over_lr, input_gradient
