"""The per-batch exchange of secure HeteroNN: the plain exchange's interface, encrypted.

:class:`SecureHostLink` and :class:`SecureCollaboratorLink` keep the plain links'
methods (``gather``/``scatter``/``gather_eval`` on the host, ``send``/``gradient``/
``send_eval`` on a collaborator), so :class:`~lightning_fed.hetero.HeteroNNModule`'s
steps run unchanged; what travels differs (see :mod:`.interactive` for the maths):

=====================  =========  ============================================
kind                   direction  content
=====================  =========  ============================================
``secure-keys``        C -> H     public context, Galois keys, layer, η, batch
``secure-features``    C -> H     ``[α]``, ``[ε_acc]``
``secure-product``     H -> C     ``[α W + ε_B]``
``secure-projected``   C -> H     ``α (W + ε_acc) + ε_B``
``secure-gradient``    H -> C     ``[αᵀ δ + ε_h]``, ``[δ (W + ε_acc)ᵀ]``
``secure-update``      C -> H     ``αᵀ δ + ε_h + ε_A / η``
``secure-eval-*``      both       the forward three, for all evaluation batches
=====================  =========  ============================================

The features the host gathers are therefore already projected: ``α (W + ε_acc)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lightning_fed.channel import Channel, Message
from lightning_fed.hetero.link import CollaboratorLink, HeteroError, HostLink, check_tensor
from lightning_fed.hetero.secure.ckks import CKKSError, CKKSEvaluator, CKKSParams, SecretKeys
from lightning_fed.hetero.secure.interactive import (
    CollaboratorLayer,
    ForwardState,
    HostLayer,
)
from lightning_fed.hetero.secure.packing import Layout, PackingError

KEYS, FEATURES, PRODUCT = "secure-keys", "secure-features", "secure-product"
PROJECTED, GRADIENT, UPDATE = "secure-projected", "secure-gradient", "secure-update"
EVAL_FEATURES, EVAL_PRODUCT = "secure-eval-features", "secure-eval-product"
EVAL_PROJECTED = "secure-eval-projected"

#: Relative difference below which two parties' ``project_layer_lr`` count as equal.
LR_TOLERANCE = 1e-9


def _blob(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _bytes(msg: Message, name: str) -> bytes:
    tensor = msg.tensors.get(name)
    if tensor is None or tensor.dtype != torch.uint8 or tensor.ndim != 1:
        raise HeteroError(f"{msg.sender!r} sent {msg.kind} without its ciphertext {name!r}")
    data: bytes = tensor.numpy().tobytes()
    return data


def _matrix(msg: Message, name: str, rows: int, width: int, what: str) -> np.ndarray:
    tensor = check_tensor(
        msg.tensors.get(name), rows=rows, party=f"{msg.sender!r}", what=what, width=width
    )
    array: np.ndarray = tensor.to(torch.float64).numpy()
    return array


class SecureHostLink(HostLink):
    """The host's side: HE products on each collaborator's ciphertexts, its shares ``W``.

    Args:
        channel, collaborators, own_key, session, timeout: as :class:`HostLink`.
        shares: the host's share ``W`` of each collaborator's projection, by feature key
            (module buffers, updated in place).
        lr: ``project_layer_lr``.
        noise_scale: the bound of the host's noise.
    """

    def __init__(
        self,
        channel: Channel,
        collaborators: Sequence[str],
        own_key: str,
        session: str,
        timeout: float,
        *,
        shares: Mapping[str, torch.Tensor],
        lr: float,
        noise_scale: float,
    ) -> None:
        super().__init__(channel, collaborators, own_key, session, timeout)
        self.shares = dict(shares)
        self.config = {k: (int(v.shape[0]), int(v.shape[1])) for k, v in self.shares.items()}
        self.lr = lr
        self.noise_scale = noise_scale
        self.layers: dict[str, HostLayer] = {}  # by node
        self._states: dict[str, ForwardState] = {}
        self._eps_h: dict[str, np.ndarray] = {}

    # -- keys ---------------------------------------------------------------------------
    def handshake(self, batch_size: int) -> None:
        """Take every collaborator's public keys and check its layer against the host's."""
        for node in self.collaborators:
            msg = self._receive(KEYS, node, 0, "public CKKS keys")
            key = self._key(msg)
            self.layers[node] = self._layer(msg, key, batch_size)

    def _layer(self, msg: Message, key: str, batch_size: int) -> HostLayer:
        node, body = msg.sender, msg.body
        if key not in self.config:
            raise HeteroError(
                f"collaborator {node!r} has feature_key {key!r}, which the host's "
                f"project_layer_config does not list ({sorted(self.config)}); hint: list "
                "every party's (feature_key, input_dim, output_dim) on every party"
            )
        theirs = tuple(body.get("layer") or ())
        if theirs != self.config[key]:
            raise HeteroError(
                f"collaborator {node!r} projects {key!r} as {theirs}, the host as "
                f"{self.config[key]} (input_dim, output_dim); hint: use the same "
                "project_layer_config on every party"
            )
        lr = body.get("lr")
        if not isinstance(lr, float) or not math.isclose(lr, self.lr, rel_tol=LR_TOLERANCE):
            raise HeteroError(
                f"collaborator {node!r} has project_layer_lr={lr}, the host {self.lr}: the "
                "collaborator needs the host's rate to keep W + ε_acc right; hint: set the "
                "same project_layer_lr on every party"
            )
        if body.get("batch_size") != batch_size:
            raise HeteroError(
                f"collaborator {node!r} packs batches of {body.get('batch_size')} rows, the "
                f"host has batch_size={batch_size}; hint: use the same batch_size everywhere"
            )
        try:
            params = CKKSParams.from_dict(dict(body.get("ckks") or {}))
            layout = Layout(batch_size, *self.config[key], params.slots)
            evaluator = CKKSEvaluator(_bytes(msg, "public"), _bytes(msg, "galois"), params)
        except (CKKSError, PackingError) as exc:
            raise HeteroError(f"collaborator {node!r}'s CKKS keys are refused: {exc}") from None
        return HostLayer(self.shares[key], layout, evaluator, self.lr, self.noise_scale)

    def _host_layer(self, node: str) -> HostLayer:
        layer = self.layers.get(node)
        if layer is None:
            raise HeteroError(f"no CKKS keys from {node!r}: handshake() did not run")
        return layer

    # -- training -----------------------------------------------------------------------
    def gather(self, step: int, digest: str, rows: int) -> dict[str, torch.Tensor]:
        """Each collaborator's projected features ``α (W + ε_acc)`` for step ``step``."""
        for node in self.collaborators:
            msg = self._receive(FEATURES, node, step, "encrypted features")
            self._key(msg)
            self._check_batch(msg, step, digest)
            start = time.perf_counter()
            product, state = self._forward(
                node, _bytes(msg, "alpha"), _bytes(msg, "eps"), rows, step
            )
            self._timed("he", start)
            self._send(PRODUCT, node, step, {"digest": digest}, {"y": _blob(product)})
            self._states[node] = state
        got: dict[str, torch.Tensor] = {}
        for node in self.collaborators:
            msg = self._receive(PROJECTED, node, step, "projected features")
            layer, state = self._host_layer(node), self._states[node]
            what = f"projected features for step {step}"
            reply = _matrix(msg, "z", rows, layer.layout.m, what)
            got[self.keys[node]] = torch.from_numpy(layer.projected(reply, state))
        return got

    def _forward(
        self, node: str, alpha: bytes, eps: bytes | None, rows: int, step: int
    ) -> tuple[bytes, ForwardState]:
        try:
            return self._host_layer(node).forward(alpha, eps, rows)
        except CKKSError as exc:
            raise HeteroError(
                f"collaborator {node!r} sent bad ciphertexts at {step}: {exc}"
            ) from None
        except ValueError as exc:  # SEAL's checks of a forged ciphertext's data
            raise HeteroError(
                f"collaborator {node!r} sent ciphertexts the host cannot use at {step}: {exc}"
            ) from None

    def scatter(self, step: int, digest: str, gradients: Mapping[str, torch.Tensor]) -> None:
        """Send each collaborator its encrypted gradients; apply its update to ``W``."""
        for node in self.collaborators:
            key = self.keys[node]
            grad = gradients.get(key)
            if grad is None:
                raise HeteroError(
                    f"no gradient for the features of {node!r} (feature key {key!r}) at step "
                    f"{step}: the loss does not depend on them; hint: fuse every party's features"
                )
            delta = grad.detach().to(device="cpu", dtype=torch.float64).numpy()
            start = time.perf_counter()
            weight_grad, input_grad, eps_h = self._host_layer(node).backward(
                self._states.pop(node), delta
            )
            self._timed("he", start)
            self._eps_h[node] = eps_h
            blobs = {"g": _blob(weight_grad), "d": _blob(input_grad)}
            self._send(GRADIENT, node, step, {"digest": digest}, blobs)
        for node in self.collaborators:
            msg = self._receive(UPDATE, node, step, "masked weight gradient")
            layer = self._host_layer(node)
            n, m = layer.layout.n, layer.layout.m
            reply = _matrix(msg, "u", n, m, f"the masked weight gradient of step {step}")
            layer.update(reply, self._eps_h.pop(node))

    # -- evaluation ---------------------------------------------------------------------
    def gather_eval(self, epoch: int, digests: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Each collaborator's projected features for all evaluation batches."""
        per_batch: list[dict[str, torch.Tensor]] = [{} for _ in digests]
        states: dict[str, list[ForwardState]] = {}
        for node in self.collaborators:
            msg = self._receive(EVAL_FEATURES, node, epoch, "encrypted evaluation features")
            self._key(msg)
            self._check_eval_batches(msg, digests)
            rows = self._eval_rows(msg, len(digests))
            start = time.perf_counter()
            products: dict[str, torch.Tensor] = {}
            states[node] = []
            for i, count in enumerate(rows):
                product, state = self._forward(node, _bytes(msg, f"a{i}"), None, count, epoch)
                products[f"y{i}"] = _blob(product)
                states[node].append(state)
            self._timed("he_eval", start)
            self._send(EVAL_PRODUCT, node, epoch, {}, products)
        for node in self.collaborators:
            msg = self._receive(EVAL_PROJECTED, node, epoch, "projected evaluation features")
            layer = self._host_layer(node)
            for i, state in enumerate(states[node]):
                what = f"projected features of evaluation batch {i}"
                reply = _matrix(msg, f"z{i}", state.rows, layer.layout.m, what)
                per_batch[i][self.keys[node]] = torch.from_numpy(layer.projected(reply, state))
        return per_batch

    def _eval_rows(self, msg: Message, batches: int) -> list[int]:
        rows = msg.body.get("rows")
        limit = self._host_layer(msg.sender).layout.rows
        if (
            not isinstance(rows, list)
            or len(rows) != batches
            or not all(isinstance(r, int) and 0 < r <= limit for r in rows)
        ):
            raise HeteroError(f"collaborator {msg.sender!r} sent malformed evaluation batches")
        return rows


class SecureCollaboratorLink(CollaboratorLink):
    """A collaborator's side: its secret keys, its share ``ε_acc``, its noise.

    Args:
        channel, host, feature_key, session, timeout: as :class:`CollaboratorLink`.
        shape: its projection's ``(input_dim, output_dim)``.
        share: ``ε_acc`` (a module buffer, updated in place).
        lr: ``project_layer_lr``.
        ckks: the CKKS parameters of its keys.
        noise_scale: the bound of ``ε_A / η``.
    """

    def __init__(
        self,
        channel: Channel,
        host: str,
        feature_key: str,
        session: str,
        timeout: float,
        *,
        shape: tuple[int, int],
        share: torch.Tensor,
        lr: float,
        ckks: CKKSParams,
        noise_scale: float,
    ) -> None:
        super().__init__(channel, host, feature_key, session, timeout)
        self.shape = shape
        self.share = share
        self.lr = lr
        self.ckks = ckks
        self.noise_scale = noise_scale
        self.layer: CollaboratorLayer | None = None
        self._rows: int | None = None  # of the batch whose features were projected

    def handshake(self, batch_size: int) -> None:
        """Make this run's CKKS keys and give the host the public part."""
        try:
            layout = Layout(batch_size, *self.shape, self.ckks.slots)
        except PackingError as exc:
            raise HeteroError(str(exc)) from None
        start = time.perf_counter()
        keys = SecretKeys(self.ckks, layout.rotation_steps())
        public, galois = keys.public_bytes(), keys.galois_bytes()
        self._timed("keys", start)
        self.layer = CollaboratorLayer(self.share, layout, keys, self.lr, self.noise_scale)
        body: dict[str, Any] = {
            "key": self.feature_key,
            "layer": list(self.shape),
            "lr": float(self.lr),
            "batch_size": batch_size,
            "ckks": self.ckks.to_dict(),
        }
        self._send(KEYS, self.host, 0, body, {"public": _blob(public), "galois": _blob(galois)})

    def _layer(self) -> CollaboratorLayer:
        if self.layer is None:
            raise HeteroError("no CKKS keys yet: handshake() did not run")
        return self.layer

    def _features(self, features: torch.Tensor) -> np.ndarray:
        if features.ndim != 2 or features.shape[1] != self.shape[0]:
            raise HeteroError(
                f"this party's features have shape {tuple(features.shape)}, but its "
                f"project_layer_config entry says input_dim={self.shape[0]}; hint: make the "
                "feature model's output width the projection's input_dim"
            )
        array: np.ndarray = features.detach().to(device="cpu", dtype=torch.float64).numpy()
        return array

    def send(self, step: int, digest: str, features: torch.Tensor) -> None:
        """Send ``[α]`` and ``[ε_acc]``; turn the host's product into projected features."""
        layer, alpha = self._layer(), self._features(features)
        start = time.perf_counter()
        blobs = {"alpha": _blob(layer.encrypt_features(alpha)), "eps": _blob(layer.encrypt_noise())}
        self._timed("encrypt", start)
        body = {"digest": digest, "key": self.feature_key}
        self._send(FEATURES, self.host, step, body, blobs)
        msg = self._receive(PRODUCT, self.host, step, "encrypted product", stop=True)
        if self._stop_word(msg):
            return
        self._check_batch(msg, step, digest)
        start = time.perf_counter()
        projected = self._finish(layer, _bytes(msg, "y"), alpha)
        self._timed("decrypt", start)
        self._send(PROJECTED, self.host, step, {"digest": digest}, {"z": projected})
        self._rows = alpha.shape[0]

    def _finish(self, layer: CollaboratorLayer, product: bytes, alpha: np.ndarray) -> torch.Tensor:
        try:
            return torch.from_numpy(layer.finish_forward(product, alpha))
        except CKKSError as exc:
            raise HeteroError(f"the host's encrypted product is unusable: {exc}") from None

    def gradient(self, step: int, digest: str, like: torch.Tensor) -> torch.Tensor | None:
        """The gradient of this batch's features ``δ (W + ε_acc)ᵀ``; None if the host stopped.

        Also answers the host's weight gradient and moves ``ε_acc`` by fresh noise.
        """
        if self.stopped:
            return None
        msg = self._receive(GRADIENT, self.host, step, "encrypted gradients", stop=True)
        if self._stop_word(msg):
            return None
        self._check_batch(msg, step, digest)
        if self._rows != like.shape[0]:
            raise HeteroError(f"gradients for step {step} before its features were projected")
        start = time.perf_counter()
        try:
            reply, input_grad = self._layer().finish_backward(
                _bytes(msg, "g"), _bytes(msg, "d"), like.shape[0]
            )
        except CKKSError as exc:
            raise HeteroError(f"the host's encrypted gradients are unusable: {exc}") from None
        self._timed("decrypt", start)
        self._send(UPDATE, self.host, step, {"digest": digest}, {"u": torch.from_numpy(reply)})
        self._rows = None
        grad = check_tensor(
            torch.from_numpy(input_grad),
            rows=like.shape[0],
            party=f"host {self.host!r}",
            what="input gradient",
            width=self.shape[0],
        )
        return grad.to(device=like.device, dtype=like.dtype)

    def send_eval(
        self, epoch: int, digests: Sequence[str], features: Sequence[torch.Tensor]
    ) -> None:
        """Project every evaluation batch through the host, encrypted."""
        layer = self._layer()
        alphas = [self._features(z) for z in features]
        start = time.perf_counter()
        blobs = {f"a{i}": _blob(layer.encrypt_features(a)) for i, a in enumerate(alphas)}
        self._timed("encrypt_eval", start)
        body = {"digests": list(digests), "key": self.feature_key, "rows": [len(a) for a in alphas]}
        self._send(EVAL_FEATURES, self.host, epoch, body, blobs)
        msg = self._receive(EVAL_PRODUCT, self.host, epoch, "encrypted evaluation products")
        start = time.perf_counter()
        projected = {
            f"z{i}": self._finish(layer, _bytes(msg, f"y{i}"), a) for i, a in enumerate(alphas)
        }
        self._timed("decrypt_eval", start)
        self._send(EVAL_PROJECTED, self.host, epoch, {}, projected)
