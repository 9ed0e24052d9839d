"""Every algorithm in a real federation: Trainers in their own processes.

The aggregator alone names the algorithm; clients learn it from the round message.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lightning_fed.algorithms import (
    Algorithm,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedProx,
    FedYogi,
    Krum,
    Median,
    Scaffold,
    TrimmedMean,
)
from tests.fedavg.parties import Federation

pytestmark = pytest.mark.slow
FAST = {"schedule_timeout": 60, "calculation_timeout": 60}
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


ALGORITHMS = [
    pytest.param(FedAvgM(lr=1.0, momentum=0.5), id="fedavgm"),
    pytest.param(FedAdam(lr=0.05), id="fedadam"),
    pytest.param(FedYogi(lr=0.05), id="fedyogi"),
    pytest.param(FedAdagrad(lr=0.05), id="fedadagrad"),
    pytest.param(FedProx(mu=0.1), id="fedprox"),
    pytest.param(Scaffold(), id="scaffold"),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_algorithm_runs_a_federation_with_partial_participation(
    fed: Any, algorithm: Algorithm
) -> None:
    """3 clients, 2 sampled per round: the round message carries the algorithm."""
    f = fed("c1", "c2", "c3")
    for i, c in enumerate(f.clients):
        f.start(c, "client", FAST, {"data_seed": i + 1, "n": 48})
    agg = {**FAST, "rounds": 3, "clients_per_round": 2, "algorithm": algorithm}
    f.start("agg", "aggregator", agg)
    assert f.wait() == {"c1": 0, "c2": 0, "c3": 0, "agg": 0}, f.log("agg")
    report = f.report()
    assert report["algorithm"] == algorithm.describe()
    assert [len(r["samples"]) for r in report["rounds"]] == [2, 2, 2]
    final = weights(f.out("agg") / "final.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in final.values())
    for c in f.clients:
        theirs = weights(f.out(c) / "final.safetensors")
        assert all(torch.equal(final[k], theirs[k]) for k in final)
        assert f"algorithm {algorithm!r}" in f.log(c)
    picked = {c for r in report["rounds"] for c in r["samples"]}
    if isinstance(algorithm, Scaffold):  # each client that trained keeps its own control
        for c in f.clients:
            state = f.root / c / "fedavg" / "t" / c / "state" / "algorithm-scaffold.pt"
            assert state.is_file() == (c in picked), c
            if c in picked:
                saved = torch.load(state, weights_only=True)
                assert saved["round"] >= 1
                assert any(bool(v.abs().sum() > 0) for v in saved["c_local"].values())


@pytest.mark.parametrize(
    "algorithm",
    [pytest.param(FedAdam(lr=0.05), id="fedadam"), pytest.param(Scaffold(), id="scaffold")],
)
def test_a_stateful_algorithm_recovers_from_an_aggregator_sigkill_exactly(
    tmp_path: Path, algorithm: Algorithm
) -> None:
    """Killed in round 3 and restarted: the run equals the uninterrupted one."""
    finals = {}
    for run in ("whole", "killed"):
        root = tmp_path / run
        root.mkdir()
        f = Federation(root, ["c1", "c2"])
        slow = {"opts": {"slow_in_round": 3, "slow_seconds": 3}}  # a window to kill in
        f.start("c1", "client", FAST, {**slow, "data_seed": 1})
        f.start("c2", "client", FAST, {"data_seed": 2, "n": 40})
        agg = {**FAST, "rounds": 4, "recovery": True, "algorithm": algorithm}
        first = f.start("agg", "aggregator", agg, key="agg-1")
        try:
            if run == "killed":
                f.wait_for_log("agg", "round 3 started")
                os.kill(first.pid, signal.SIGKILL)
                first.join(10)
                f.start("agg", "aggregator", agg, key="agg-2")
            codes = f.wait()
        finally:
            for p in f.procs.values():
                if p.is_alive():
                    p.kill()
        aggregators = {"agg-1": -9, "agg-2": 0} if run == "killed" else {"agg-1": 0}
        want = {"c1": 0, "c2": 0, **aggregators}
        assert codes == want, f.log("agg")
        report = json.loads((f.out("agg") / "report.json").read_text())
        assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
        if run == "killed":
            assert "resuming after round 2" in f.log("agg")
        finals[run] = weights(f.out("agg") / "final.safetensors")
    for k, v in finals["whole"].items():  # updates may arrive in another order: float sums
        torch.testing.assert_close(finals["killed"][k], v, rtol=1e-5, atol=1e-6)


def test_fedprox_and_scaffold_run_under_mixed_precision_with_accumulation(fed: Any) -> None:
    f = fed("c1", "c2")
    trainer = {"precision": "bf16-mixed", "accumulate_grad_batches": 2}
    f.start("c1", "client", FAST, {"data_seed": 1, "trainer": trainer})
    f.start("c2", "client", FAST, {"data_seed": 2, "trainer": {"accumulate_grad_batches": 2}})
    f.start("agg", "aggregator", {**FAST, "rounds": 2, "algorithm": Scaffold()})
    assert f.wait() == {"c1": 0, "c2": 0, "agg": 0}, f.log("agg") + f.log("c1")
    assert f.report()["rounds_completed"] == 2


def test_a_client_that_does_not_know_the_algorithm_says_so_and_the_round_fails_at_once(
    fed: Any,
) -> None:
    from tests.algorithms.custom import Halving

    f = fed("c1")
    f.start("c1", "client", {**FAST, "calculation_timeout": 900})
    f.start("agg", "aggregator", {**FAST, "calculation_timeout": 900, "algorithm": Halving()})
    codes = f.wait(timeout=200)
    assert codes == {"c1": 1, "agg": 1}, f.log("agg")
    assert "runs algorithm 'halving', which this client does not know" in f.log("c1")
    assert "hint: import the module that defines it" in f.log("agg")


def test_the_documented_one_file_algorithm_runs_in_a_federation(
    fed: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/algorithms.md's example: each client's update is clipped to max_norm."""
    monkeypatch.syspath_prepend(str(EXAMPLES / "algorithms"))  # spawned parties inherit it
    import lightning.pytorch as L
    from norm_clip import NormClip

    from tests.fedavg.parties import TinyNet

    max_norm = 0.05
    f = fed("c1")
    f.start("c1", "client", FAST, {"imports": ["norm_clip"]})
    f.start("agg", "aggregator", {**FAST, "rounds": 1, "algorithm": NormClip(max_norm)})
    assert f.wait() == {"c1": 0, "agg": 0}, f.log("agg") + f.log("c1")
    L.seed_everything(0, verbose=False)  # the aggregator's initial model, seeded alike
    initial = TinyNet().state_dict()
    final = weights(f.out("agg") / "final.safetensors")
    norm = torch.linalg.vector_norm(torch.stack([(final[k] - initial[k]).norm() for k in final]))
    assert float(norm) == pytest.approx(max_norm, rel=1e-4)  # equal only if it was clipped
    assert "algorithm NormClip(max_norm=0.05)" in f.log("c1")


@pytest.mark.parametrize(
    "algorithm",
    [
        pytest.param(Median(), id="median"),
        pytest.param(TrimmedMean(beta=0.2), id="trimmed-mean"),
        pytest.param(Krum(byzantine=1, select=2), id="multi-krum"),
    ],
)
def test_robust_aggregation_ignores_a_client_sending_huge_weights(
    fed: Any, algorithm: Algorithm
) -> None:
    """5 clients, one of which sends 100 in every coordinate of every round's update."""
    f = fed("c1", "c2", "c3", "c4", "c5")
    for i, c in enumerate(f.clients):
        party: dict[str, Any] = {"data_seed": i + 1, "n": 32}
        if c == "c5":
            party["tamper_every_round"] = "huge"
        f.start(c, "client", FAST, party)
    f.start("agg", "aggregator", {**FAST, "rounds": 2, "algorithm": algorithm})
    assert f.wait() == {c: 0 for c in [*f.clients, "agg"]}, f.log("agg")
    report = f.report()
    assert [len(r["samples"]) for r in report["rounds"]] == [5, 5]  # c5's were folded in
    final = weights(f.out("agg") / "final.safetensors")
    assert max(float(t.abs().max()) for t in final.values()) < 10  # FedAvg's would be ~20
