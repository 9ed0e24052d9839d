"""The secure interactive layer, both sides in one process with real TenSEAL keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_fed.hetero.secure.ckks import CKKSEvaluator, CKKSParams, SecretKeys
from lightning_fed.hetero.secure.interactive import CollaboratorLayer, HostLayer, initial_share
from lightning_fed.hetero.secure.packing import Layout
from tests.hetero.secure.leaks import KnownValues

LR = 0.05


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def pair(batch: int, n: int, m: int) -> tuple[HostLayer, CollaboratorLayer]:
    layout = Layout(batch, n, m, CKKSParams().slots)
    keys = SecretKeys(CKKSParams(), layout.rotation_steps())
    evaluator = CKKSEvaluator(keys.public_bytes(), keys.galois_bytes(), CKKSParams())
    generator = torch.Generator().manual_seed(n * m)
    host = HostLayer(initial_share(n, m, generator), layout, evaluator, LR, noise_scale=1.0)
    collaborator = CollaboratorLayer(
        initial_share(n, m, generator), layout, keys, LR, noise_scale=1.0
    )
    return host, collaborator


@pytest.mark.parametrize(
    ("batch", "n", "m", "rows"),
    [(16, 6, 6, 16), (16, 3, 7, 16), (16, 9, 2, 11), (128, 20, 20, 128)],
    ids=["square", "wide", "tall-short-batch", "mnist-halves"],
)
def test_steps_equal_the_plain_projection_with_weights_w_plus_eps_acc(
    batch: int, n: int, m: int, rows: int
) -> None:
    host, collaborator = pair(batch, n, m)
    rng = np.random.default_rng(0)
    for _ in range(3):
        true = (host.weight + collaborator.noise).numpy().copy()
        alpha, delta = rng.standard_normal((rows, n)), rng.standard_normal((rows, m))
        messages = []  # everything the host receives

        sent = (collaborator.encrypt_features(alpha), collaborator.encrypt_noise())
        messages += sent
        product, state = host.forward(*sent, rows=rows)
        reply = collaborator.finish_forward(product, alpha)
        messages.append(reply)
        z = host.projected(reply, state)
        assert relative_error(z, alpha @ true) <= 1e-3

        gradient, inputs, eps_h = host.backward(state, delta)
        answer, input_gradient = collaborator.finish_backward(gradient, inputs, rows)
        messages.append(answer)
        host.update(answer, eps_h)
        assert relative_error(input_gradient, delta @ true.T) <= 1e-3
        stepped = (host.weight + collaborator.noise).numpy()
        assert relative_error(stepped, true - LR * alpha.T @ delta) <= 1e-3

        assert_no_feature_value_in(messages, alpha)


def assert_no_feature_value_in(messages: list[object], alpha: np.ndarray) -> None:
    """Neither as numbers nor as raw bytes does a value of α appear."""
    secret = KnownValues([alpha])
    for message in messages:
        if isinstance(message, bytes):
            assert not secret.in_bytes(message)
        else:
            assert not secret.in_tensor(message), "a feature value reached the host"


def test_the_shares_alone_are_noise_and_each_update_moves_them_by_fresh_noise() -> None:
    host, collaborator = pair(16, 4, 4)
    before_w, before_e = host.weight.clone(), collaborator.noise.clone()
    rows = 16
    alpha, delta = np.ones((rows, 4)), np.zeros((rows, 4))  # a zero gradient
    product, state = host.forward(
        collaborator.encrypt_features(alpha), collaborator.encrypt_noise(), rows
    )
    collaborator.finish_forward(product, alpha)
    gradient, inputs, eps_h = host.backward(state, delta)
    answer, _ = collaborator.finish_backward(gradient, inputs, rows)
    host.update(answer, eps_h)
    moved = host.weight - before_w
    assert moved.abs().max() > 1e-3  # W moved by -ε_A though the gradient is zero ...
    # ... W + ε_acc did not
    torch.testing.assert_close(host.weight + collaborator.noise, before_w + before_e)
