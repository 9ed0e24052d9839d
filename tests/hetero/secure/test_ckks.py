"""CKKS keys and evaluation with TenSEAL: 128-bit parameters; the host can never decrypt."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from lightning_fed.hetero.secure.ckks import (
    MAX_COEFF_BITS_128,
    CKKSError,
    CKKSEvaluator,
    CKKSParams,
    SecretKeys,
)
from lightning_fed.hetero.secure.packing import Layout


@pytest.fixture(scope="module")
def keys() -> SecretKeys:
    return SecretKeys(CKKSParams(), Layout(16, 3, 7, 4096).rotation_steps())


@pytest.fixture(scope="module")
def evaluator(keys: SecretKeys) -> CKKSEvaluator:
    return CKKSEvaluator(keys.public_bytes(), keys.galois_bytes(), CKKSParams())


def test_the_default_parameters_are_128_bit_secure() -> None:
    params = CKKSParams()
    assert params.poly_modulus_degree == 8192 and params.total_bits == 160
    assert params.total_bits <= MAX_COEFF_BITS_128[8192] == 218


def test_parameters_above_the_128_bit_bound_are_refused_here_and_by_seal() -> None:
    with pytest.raises(CKKSError, match=r"sum to 240 bits, above the 218 bits"):
        CKKSParams(coeff_mod_bit_sizes=(60, 60, 60, 60))
    with pytest.raises(ValueError):  # SEAL's own check (sec_level tc128) agrees
        ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 60, 60, 60])
    ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 49, 49, 60])  # 218 bits
    with pytest.raises(CKKSError, match="at least 3 primes"):
        CKKSParams(coeff_mod_bit_sizes=(60, 60))
    with pytest.raises(CKKSError, match="poly_modulus_degree=1000"):
        CKKSParams(poly_modulus_degree=1000)


def test_the_hosts_context_is_public_and_cannot_decrypt(
    keys: SecretKeys, evaluator: CKKSEvaluator
) -> None:
    assert keys.context.is_private()
    assert not evaluator.context.is_private() and evaluator.context.is_public()
    with pytest.raises(ValueError, match=r"(?i)secret"):
        evaluator.context.secret_key()
    mine = ts.ckks_vector(evaluator.context, [1.5, 2.5])  # it may encrypt (public key) ...
    with pytest.raises(ValueError, match=r"(?i)secret"):
        mine.decrypt()  # ... never decrypt
    theirs = ts.ckks_vector(keys.context, [3.25])
    with pytest.raises(ValueError, match=r"(?i)secret"):
        ts.ckks_vector_from(evaluator.context, theirs.serialize()).decrypt()


def test_the_host_refuses_a_context_holding_the_secret_key(keys: SecretKeys) -> None:
    private = keys.context.serialize(save_secret_key=True)
    with pytest.raises(CKKSError, match="holding its secret key; the host refuses it"):
        CKKSEvaluator(private, keys.galois_bytes(), CKKSParams())


def test_the_host_refuses_a_context_of_other_parameters(keys: SecretKeys) -> None:
    other = CKKSParams(coeff_mod_bit_sizes=(60, 40, 40, 60))
    with pytest.raises(CKKSError, match=r"primes of \[60, 40, 60\] bits, but the agreed"):
        CKKSEvaluator(keys.public_bytes(), keys.galois_bytes(), other)


def test_corrupt_ciphertexts_and_stale_ones_are_named(
    keys: SecretKeys, evaluator: CKKSEvaluator
) -> None:
    data = keys.encrypt(np.arange(5.0))
    with pytest.raises(CKKSError, match="not a ciphertext of these CKKS parameters"):
        evaluator.from_bytes(data[: len(data) // 2])
    ct = evaluator.from_bytes(data)
    evaluator.check_fresh(ct, "x")
    rotated = evaluator.dot([(ct, np.ones(4096))])  # one level down
    with pytest.raises(CKKSError, match="x is not a fresh ciphertext"):
        evaluator.check_fresh(rotated, "x")


def test_encrypt_rotate_decrypt_round_trip(keys: SecretKeys, evaluator: CKKSEvaluator) -> None:
    values = np.linspace(-3, 3, 4096)
    ct = evaluator.from_bytes(keys.encrypt(values))
    step = keys.rotation_steps[0]
    got = keys.decrypt(evaluator.to_bytes(evaluator.rotate(ct, step)))
    np.testing.assert_allclose(got, np.roll(values, -step), atol=1e-5)
    with pytest.raises(CKKSError, match="no Galois key"):
        evaluator.rotate(ct, 5)
