"""The packing algebra of the secure layer, on plain slot vectors (exact)."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_fed.hetero.secure.packing import DiagonalPlan, Layout, PackingError, PlainOps

SHAPES = [  # (batch size, n, m, rows of this batch)
    (128, 20, 20, 128),  # the seed's MNIST halves
    (128, 20, 20, 37),  # its last, shorter batch
    (32, 32, 32, 32),  # digits halves
    (16, 3, 7, 11),  # wider than tall
    (16, 9, 2, 16),  # taller than wide
    (3, 4, 5, 3),  # fewer rows than outputs
    (1, 1, 1, 1),
]


@pytest.mark.parametrize(("batch", "n", "m", "rows"), SHAPES)
def test_the_three_products_are_exact_on_plain_slots(batch: int, n: int, m: int, rows: int) -> None:
    rng = np.random.default_rng(batch * 100 + n * 10 + m)
    layout = Layout(batch, n, m, 4096)
    ops = PlainOps(4096)
    alpha, weight = rng.standard_normal((rows, n)), rng.standard_normal((n, m))
    delta, eps = rng.standard_normal((rows, m)), rng.standard_normal((n, m))
    features, noise = layout.encode_features(alpha), layout.encode_noise(eps)

    forward = layout.forward(ops, features, weight)
    np.testing.assert_allclose(layout.read_forward(forward, rows), alpha @ weight, atol=1e-12)
    # nothing but α W in the forward product: the collaborator decrypts only that
    np.testing.assert_allclose(forward, layout.forward_output(alpha @ weight, rows), atol=1e-12)

    gradient = layout.read_weight(layout.weight_gradient(ops, features, delta))
    np.testing.assert_allclose(gradient, alpha.T @ delta, atol=1e-12)

    inputs = layout.input_gradient(ops, noise, delta)
    np.testing.assert_allclose(layout.read_input(inputs, rows), delta @ eps.T, atol=1e-12)
    np.testing.assert_allclose(inputs, layout.input_output(delta @ eps.T), atol=1e-12)


def test_baby_step_giant_step_needs_about_two_square_roots_of_rotations() -> None:
    plan = DiagonalPlan(count=39, stride=179, offset=-19, slots=4096)
    assert (plan.baby, plan.giant) == (7, 6)
    assert len(plan.steps()) <= plan.baby - 1 + plan.giant
    layout = Layout(128, 20, 20, 4096)
    assert layout.padded == 160 and layout.sum_steps == 3 and layout.block == 179
    assert len(layout.rotation_steps()) == 21  # Galois keys the collaborator makes


def test_a_layer_too_large_for_one_ciphertext_is_named_with_a_hint() -> None:
    with pytest.raises(PackingError, match=r"needs 14360 slots .* has 4096; hint: lower batch"):
        Layout(256, 40, 40, 4096)
    Layout(256, 40, 40, 16384)  # fits with poly_modulus_degree 32768


def test_bad_shapes_are_refused() -> None:
    layout = Layout(8, 3, 2, 4096)
    with pytest.raises(ValueError, match=r"features of shape \(9, 3\); expected \(<= 8, 3\)"):
        layout.encode_features(np.zeros((9, 3)))
    with pytest.raises(ValueError, match="gradient of shape"):
        layout.weight_diagonals(np.zeros((8, 3)))
    with pytest.raises(ValueError, match="rows must be positive"):
        Layout(0, 3, 2, 4096)
