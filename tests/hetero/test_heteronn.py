"""HeteroNN split learning with real parties in real processes (spawned), over a folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_fed.simulate import make_keys
from tests.hetero import parties
from tests.processes import CTX

pytestmark = pytest.mark.slow


def run(root: Path, ranges: dict[str, Any], timeout: float = 240, **opts: Any) -> dict[str, Any]:
    nodes = list(ranges)
    if not (root / "keys").exists():  # a restart reuses the first run's keys
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


def central(
    nodes: list[str],
    train_ids: list[int],
    epochs: int,
    batch_size: int,
    frozen: Any = (),
    model: L.LightningModule | None = None,
) -> Any:
    """``model`` (default: the composed plain model) trained in the parties' batch order."""
    model = model or parties.Composed(nodes, frozen=frozen)
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


def errors_of(root: Path, nodes: list[str]) -> dict[str, str]:
    return {n: error_of(root, n) for n in nodes if error_of(root, n)}


def load_saved(root: Path, nodes: list[str]) -> dict[str, Any]:
    return {n: torch.load(root / f"{n}.pt", weights_only=False) for n in nodes}


def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def assert_equals_composed(
    saved: dict[str, Any], nodes: list[str], epochs: int, frozen: Any = ()
) -> None:
    """Every party's weights equal the composed model's, trained centrally in the same order."""
    train_ids = saved["host"]["train_ids"]
    assert all(saved[n]["train_ids"] == train_ids for n in nodes)  # the same split everywhere
    composed = central(nodes, train_ids, epochs=epochs, batch_size=8, frozen=frozen)
    for n in nodes:
        got = part(saved[n]["state"], "feature_model.")
        for k, want in composed.features[n].state_dict().items():
            torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
    host_inference = part(saved["host"]["state"], "inference_model.")
    for k, v in composed.inference.state_dict().items():
        torch.testing.assert_close(host_inference[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("collaborators", [1, 2])
def test_split_learning_equals_the_composed_model_trained_centrally(
    tmp_path: Path, collaborators: int
) -> None:
    """Host + N collaborators for 3 epochs == one module holding every part, same order."""
    ranges = {"host": (0, 70), "c1": (10, 80), "c2": (5, 75)}
    nodes = ["host", "c1", "c2"][: collaborators + 1]
    codes = run(tmp_path, {n: ranges[n] for n in nodes})
    assert codes == dict.fromkeys(nodes, 0), (codes, errors_of(tmp_path, nodes))
    saved = load_saved(tmp_path, nodes)
    assert len(saved["host"]["train_ids"]) == 48  # 60 common IDs (10..69), 20% held out
    assert_equals_composed(saved, nodes, epochs=3)


def test_a_frozen_collaborator_sends_features_and_keeps_its_weights(tmp_path: Path) -> None:
    """is_feature_trainable=False on c1: c1 never changes; the rest trains as if c1 were fixed."""
    nodes = ["host", "c1"]
    codes = run(tmp_path, {"host": (0, 70), "c1": (10, 80)}, frozen=["c1"])
    assert codes == dict.fromkeys(nodes, 0), (codes, errors_of(tmp_path, nodes))
    saved = load_saved(tmp_path, nodes)
    initial = parties.feature_model("c1").state_dict()
    for k, v in part(saved["c1"]["state"], "feature_model.").items():
        assert torch.equal(v, initial[k])
    assert_equals_composed(saved, nodes, epochs=3, frozen=["c1"])
    assert not torch.equal(  # the host did train
        saved["host"]["state"]["feature_model.0.weight"],
        parties.feature_model("host").state_dict()["0.weight"],
    )


@pytest.mark.parametrize("dies", ["c1", "host"])
def test_after_a_crash_a_restart_with_recovery_resumes_and_ends_as_if_uninterrupted(
    tmp_path: Path, dies: str
) -> None:
    """A party dies in epoch 2 (of 4); restarting both with recovery resumes after epoch 1.

    6 batches per epoch: step 15 is the third batch of epoch 2. The restarted run's
    final weights equal the composed model trained centrally for 4 epochs, so the
    weights, the optimizers' momentum and the batch order were all restored.
    """
    nodes = ["host", "c1"]
    ranges = {"host": (0, 70), "c1": (10, 80)}
    opts: dict[str, Any] = {"epochs": 4, "recovery": True, "calculation_timeout": 8}
    codes = run(tmp_path, ranges, **opts, faults={dies: {"die_at_step": 15}})
    assert codes[dies] == -9 and codes["host" if dies == "c1" else "c1"] == 1
    for n in nodes:
        assert sorted(p.name for p in (tmp_path / n / "state").iterdir()) == [
            "epoch-000000.ckpt",
            "epoch-000001.ckpt",
        ]
    codes = run(tmp_path, ranges, **opts)
    assert codes == dict.fromkeys(nodes, 0), (codes, errors_of(tmp_path, nodes))
    saved = load_saved(tmp_path, nodes)
    for n in nodes:
        report = saved[n]["report"]
        assert report["resumed_after_epoch"] == 1
        assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2, 3]
        assert json.loads((tmp_path / n / "report.json").read_text())["epochs"] == report["epochs"]
        states = sorted(p.name for p in (tmp_path / n / "state").iterdir())
        assert states == ["epoch-000002.ckpt", "epoch-000003.ckpt"]  # the last two are kept
    assert_equals_composed(saved, nodes, epochs=4)


def test_without_recovery_a_restart_starts_over(tmp_path: Path) -> None:
    nodes = ["host", "c1"]
    ranges = {"host": (0, 70), "c1": (10, 80)}
    codes = run(
        tmp_path, ranges, epochs=2, calculation_timeout=8, faults={"c1": {"die_at_step": 9}}
    )
    assert codes == {"host": 1, "c1": -9}
    assert not (tmp_path / "c1" / "state").exists()
    assert run(tmp_path, ranges, epochs=2) == dict.fromkeys(nodes, 0)
    saved = load_saved(tmp_path, nodes)
    assert saved["host"]["report"]["resumed_after_epoch"] is None
    assert_equals_composed(saved, nodes, epochs=2)


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


def test_log_rounds_sets_the_validation_schedule_that_collaborators_follow(
    tmp_path: Path,
) -> None:
    """The host validates every 2nd epoch; c1's own Trainer says every 3rd, and it follows."""
    ranges = {"host": (0, 70), "c1": (10, 80)}
    codes = run(tmp_path, ranges, epochs=4, log_rounds=2, val_every={"c1": 3}, test=True)
    assert codes == {"host": 0, "c1": 0}, errors_of(tmp_path, ["host", "c1"])
    report = load_saved(tmp_path, ["host"])["host"]["report"]
    validated = ["val_acc" in e["metrics"] for e in report["epochs"]]
    assert validated == [False, True, True, True]  # first after epoch 1; then it stays logged
    assert report["epochs"][1]["metrics"]["val_acc"] != report["epochs"][3]["metrics"]["val_acc"]
    assert set(report["test_metrics"]) == {"test_loss", "test_acc"}


def test_a_host_that_stops_mid_epoch_stops_its_collaborators_cleanly(tmp_path: Path) -> None:
    """max_steps=9 on the host: the 3rd batch of epoch 1; c1 gets a stop, not a gradient."""
    ranges = {"host": (0, 70), "c1": (10, 80)}
    assert run(tmp_path, ranges, epochs=4, max_steps=9, test=True) == {"host": 0, "c1": 0}
    saved = load_saved(tmp_path, ["host", "c1"])
    for n in ("host", "c1"):  # only the complete epoch is in the report
        assert [e["epoch"] for e in saved[n]["report"]["epochs"]] == [0]
    assert "test_acc" in saved["host"]["metrics"]  # the test after fit ran on both


def test_a_callback_that_stops_mid_epoch_validates_on_every_party(tmp_path: Path) -> None:
    """A host callback sets should_stop after step 9: Lightning validates, then stops."""
    ranges = {"host": (0, 70), "c1": (10, 80)}
    codes = run(tmp_path, ranges, epochs=4, stop_after_step=9, test=True)
    assert codes == {"host": 0, "c1": 0}, errors_of(tmp_path, ["host", "c1"])
    saved = load_saved(tmp_path, ["host", "c1"])
    assert "val_acc" in saved["host"]["metrics"] and "test_acc" in saved["host"]["metrics"]


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
    """Another split seed: the same sizes, other batches; the first batch's digest differs."""
    ranges = {"host": (0, 70), "c1": (10, 80)}
    codes = run(tmp_path, ranges, calculation_timeout=30, seeds={"c1": 5})
    assert codes["host"] == 1
    assert "'c1' sent features of batch" in error_of(tmp_path, "host")
    assert "batches disagree" in error_of(tmp_path, "host")
    assert "host stopped the run" in error_of(tmp_path, "c1")


def test_another_batch_size_is_named_before_training(tmp_path: Path) -> None:
    ranges = {"host": (0, 70), "c1": (10, 80)}
    codes = run(tmp_path, ranges, calculation_timeout=30, batch_sizes={"c1": 6})
    assert codes == {"host": 1, "c1": 1}
    assert "collaborator 'c1' has batch_size=6, the host 8" in error_of(tmp_path, "host")


@pytest.mark.parametrize("twice", ["host", "c1"])
def test_a_party_started_twice_runs_once_and_the_other_is_refused(
    tmp_path: Path, twice: str
) -> None:
    """Two live processes of one node id: one takes part, the other stops, naming it."""
    ranges = {"host": (0, 60), "c1": (10, 70)}
    make_keys(tmp_path, "t", list(ranges))
    start = [*ranges, twice]
    procs = [
        CTX.Process(target=parties.run_party, args=(str(tmp_path), n, list(ranges), ranges, {}))
        for n in start
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    codes = sorted((n, p.exitcode) for n, p in zip(start, procs))
    other = "c1" if twice == "host" else "host"
    assert sorted(codes) == sorted([(other, 0), (twice, 0), (twice, 1)]), errors_of(
        tmp_path, list(ranges)
    )
    refused = error_of(tmp_path, twice)
    assert refused.startswith(f"NodeBusyError: node {twice!r} of task 't' already runs as")
    assert (tmp_path / f"{twice}.pt").is_file()  # the one that ran finished and saved
