"""HeteroNN split learning with real parties in real processes (spawned), over a folder."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_fed.simulate import make_keys
from tests.hetero import parties

pytestmark = pytest.mark.slow
CTX = mp.get_context("spawn")


def run(root: Path, ranges: dict[str, Any], timeout: float = 240, **opts: Any) -> dict[str, Any]:
    nodes = list(ranges)
    make_keys(root, "t", nodes)
    procs = {
        n: CTX.Process(target=parties.run_party, args=(str(root), n, nodes, ranges, opts))
        for n in nodes
    }
    for p in procs.values():
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs.values():
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    return {n: p.exitcode for n, p in procs.items()}


def central(nodes: list[str], train_ids: list[int], epochs: int, batch_size: int) -> Any:
    model = parties.Composed(nodes)
    loader = DataLoader(
        parties.composed_batches(nodes, train_ids, epochs, batch_size), batch_size=None
    )
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, train_dataloaders=loader)
    return model


@pytest.mark.parametrize("collaborators", [1, 2])
def test_split_learning_equals_the_composed_model_trained_centrally(
    tmp_path: Path, collaborators: int
) -> None:
    """Host + N collaborators for 3 epochs == one module holding every part, same order."""
    ranges = {"host": (0, 70), "c1": (10, 80), "c2": (5, 75)}
    nodes = ["host", "c1", "c2"][: collaborators + 1]
    codes = run(tmp_path, {n: ranges[n] for n in nodes})
    errors = {
        n: (tmp_path / f"{n}.error").read_text()
        for n in nodes
        if (tmp_path / f"{n}.error").exists()
    }
    assert codes == dict.fromkeys(nodes, 0), (codes, errors)
    saved = {n: torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in nodes}
    train_ids = saved["host"]["train_ids"]
    assert all(saved[n]["train_ids"] == train_ids for n in nodes)  # the same split everywhere
    assert len(train_ids) == 48  # 60 common IDs (10..69), 20% held out
    composed = central(nodes, train_ids, epochs=3, batch_size=8)
    for n in nodes:
        got = {
            k[len("feature_model.") :]: v
            for k, v in saved[n]["state"].items()
            if k.startswith("feature_model.")
        }
        want = composed.features[n].state_dict()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    host_inference = {
        k[len("inference_model.") :]: v
        for k, v in saved["host"]["state"].items()
        if k.startswith("inference_model.")
    }
    for k, v in composed.inference.state_dict().items():
        torch.testing.assert_close(host_inference[k], v, rtol=1e-5, atol=1e-6)


def error_of(root: Path, node: str) -> str:
    path = root / f"{node}.error"
    return path.read_text() if path.exists() else ""


def test_validation_every_epoch_and_the_final_test_are_logged_on_the_host(tmp_path: Path) -> None:
    ranges = {"host": (0, 70), "c1": (10, 80)}
    assert run(tmp_path, ranges, epochs=2, test=True) == {"host": 0, "c1": 0}
    metrics = torch.load(tmp_path / "host.pt", weights_only=False)["metrics"]
    for name in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc"):
        assert name in metrics, metrics
    assert 0.0 <= metrics["test_acc"] <= 1.0


def test_a_collaborator_killed_mid_epoch_is_named_by_the_host(tmp_path: Path) -> None:
    ranges = {"host": (0, 70), "c1": (10, 80)}
    started = time.monotonic()
    codes = run(tmp_path, ranges, calculation_timeout=4, faults={"c1": {"die_at_step": 3}})
    assert codes["host"] == 1 and codes["c1"] == -9
    assert "no features from c1 within calculation_timeout=4 s (step 2)" in error_of(
        tmp_path, "host"
    )
    assert time.monotonic() - started < 120


def test_nan_features_stop_every_party_with_the_reason(tmp_path: Path) -> None:
    ranges = {"host": (0, 70), "c1": (10, 80), "c2": (5, 75)}
    codes = run(tmp_path, ranges, calculation_timeout=60, faults={"c2": {"nan_at_step": 2}})
    assert codes == {"host": 1, "c1": 1, "c2": 1}
    host = error_of(tmp_path, "host")
    assert "collaborator 'c2' sent features for step 1 holding NaN or Inf" in host
    # The host's abort reaches the others at once, not after calculation_timeout.
    assert "host stopped the run: HeteroError: collaborator 'c2'" in error_of(tmp_path, "c1")


def test_misaligned_batches_are_named(tmp_path: Path) -> None:
    ranges = {"host": (0, 70), "c1": (10, 80)}
    codes = run(tmp_path, ranges, calculation_timeout=30, batch_sizes={"c1": 6})
    assert codes["host"] == 1
    assert "'c1' sent features of batch" in error_of(tmp_path, "host")
    assert "batches disagree" in error_of(tmp_path, "host")
