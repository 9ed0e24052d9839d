"""Secure HeteroNN with real parties in real processes, real TenSEAL keys, over a folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.hetero import parties
from tests.hetero.secure.leaks import KnownValues
from tests.hetero.test_heteronn import central, errors_of, load_saved, part, run

pytestmark = pytest.mark.slow
RANGES = {"host": (0, 70), "c1": (10, 80), "c2": (5, 75)}


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to CKKS precision: relative error at most 1e-3."""
    error = (got.double() - want.double()).abs().max() / want.double().abs().max()
    assert error <= 1e-3, f"relative error {float(error):.2e}"


def assert_secure_equals_composed(saved: dict[str, Any], nodes: list[str], epochs: int) -> None:
    train_ids = saved["host"]["train_ids"]
    composed = central(nodes, train_ids, epochs, 8, model=parties.SecureComposed(nodes))
    host = saved["host"]["state"]
    for n in nodes:
        got = part(saved[n]["state"], "feature_model.")
        for k, want in composed.features[n].state_dict().items():
            assert_close(got[k], want)
        if n != "host":  # the true weight is the sum of the two shares
            w, eps = host[f"secure_shares.{n}"], saved[n]["state"][f"secure_shares.{n}"]
            assert_close(w + eps, composed.trues[n].detach())
    for k, want in composed.projection.state_dict().items():
        assert_close(host[f"projection.{k}"], want)
    for k, want in composed.inference.state_dict().items():
        assert_close(part(host, "inference_model.")[k], want)


@pytest.fixture(scope="module")
def three_parties(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Host + 2 collaborators, 3 epochs and a test, secure; run once for several tests."""
    root = tmp_path_factory.mktemp("secure3")
    nodes = ["host", "c1", "c2"]
    codes = run(root, RANGES, secure=True, test=True)
    assert codes == dict.fromkeys(nodes, 0), (codes, errors_of(root, nodes))
    return root, load_saved(root, nodes)


def test_secure_split_learning_equals_the_composed_model_with_w_plus_eps_acc(
    three_parties: tuple[Path, dict[str, Any]],
) -> None:
    """Host + 2 collaborators, non-square projections (4 -> 3): equal to CKKS precision."""
    _, saved = three_parties
    assert len(saved["host"]["train_ids"]) == 48
    assert_secure_equals_composed(saved, ["host", "c1", "c2"], epochs=3)
    assert "test_acc" in saved["host"]["metrics"]
    epochs = saved["host"]["report"]["epochs"]
    assert len(epochs) == 3 and epochs[0]["phases"]["he"] > 0
    assert saved["c1"]["report"]["epochs"][0]["phases"]["encrypt"] > 0


def test_no_collaborator_feature_value_reaches_the_host(
    three_parties: tuple[Path, dict[str, Any]],
) -> None:
    """Every message the host received, and everything it stored, holds no feature value
    of a collaborator: not its raw columns, not any feature tensor it computed."""
    root, saved = three_parties
    known = []
    for n in ("c1", "c2"):
        lo, hi = RANGES[n]
        known += [parties.features(n, i) for i in range(lo, hi)]  # raw columns
        known += saved[n]["sent"]  # every feature tensor, every step and evaluation
    secret = KnownValues(known)

    received = saved["host"]["received"]
    kinds = {m["kind"] for m in received}
    assert {"secure-features", "secure-projected", "secure-update"} <= kinds
    assert "features" not in kinds and "eval-features" not in kinds  # no plain exchange
    for message in received:
        assert not secret.in_bytes(json.dumps(message["body"]).encode())
        for name, tensor in message["tensors"].items():
            if tensor.dtype == torch.uint8:  # a ciphertext or a key
                assert not secret.in_bytes(tensor.numpy().tobytes()), (message["kind"], name)
            else:
                assert not secret.in_tensor(tensor), (message["kind"], name)
    stored = [p for p in (root / "host").rglob("*") if p.is_file()]
    assert stored
    for path in stored:
        assert not secret.in_bytes(path.read_bytes()), path
    # the check itself finds what it looks for
    assert secret.in_tensor(saved["c1"]["sent"][0].double())
    assert secret.in_bytes(b"xyz" + saved["c1"]["sent"][0].numpy().tobytes())


def test_after_a_crash_a_restart_with_recovery_resumes_with_the_shares(tmp_path: Path) -> None:
    """The collaborator dies in epoch 2 (of 4); both restart with recovery: the restored
    W (host) and ε_acc (collaborator) continue as if uninterrupted."""
    nodes = ["host", "c1"]
    ranges = {n: RANGES[n] for n in nodes}
    opts: dict[str, Any] = {"epochs": 4, "recovery": True, "calculation_timeout": 8}
    codes = run(tmp_path, ranges, secure=True, **opts, faults={"c1": {"die_at_step": 15}})
    assert codes == {"host": 1, "c1": -9}
    checkpoint = torch.load(tmp_path / "c1" / "state" / "epoch-000001.ckpt", weights_only=False)
    assert "secure_shares.c1" in checkpoint["state_dict"]  # ε_acc is in the checkpoint
    codes = run(tmp_path, ranges, secure=True, **opts)
    assert codes == dict.fromkeys(nodes, 0), (codes, errors_of(tmp_path, nodes))
    saved = load_saved(tmp_path, nodes)
    for n in nodes:
        assert saved[n]["report"]["resumed_after_epoch"] == 1
    assert_secure_equals_composed(saved, nodes, epochs=4)


def test_a_host_that_stops_mid_epoch_stops_its_secure_collaborator(tmp_path: Path) -> None:
    """max_steps=9: c1 gets a stop while it waits for the encrypted product, then tests."""
    ranges = {n: RANGES[n] for n in ("host", "c1")}
    codes = run(tmp_path, ranges, secure=True, epochs=4, max_steps=9, test=True)
    assert codes == {"host": 0, "c1": 0}, errors_of(tmp_path, ["host", "c1"])
    saved = load_saved(tmp_path, ["host", "c1"])
    assert "test_acc" in saved["host"]["metrics"]


def test_a_different_project_layer_lr_is_named_before_training(tmp_path: Path) -> None:
    ranges = {n: RANGES[n] for n in ("host", "c1")}
    codes = run(tmp_path, ranges, secure=True, calculation_timeout=30, project_lr={"c1": 0.02})
    assert codes == {"host": 1, "c1": 1}
    errors = errors_of(tmp_path, ["host", "c1"])
    assert "collaborator 'c1' has project_layer_lr=0.02, the host 0.05" in errors["host"]
    assert "host stopped the run" in errors["c1"]
