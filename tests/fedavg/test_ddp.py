"""A FedAvg client that trains with Lightning's DDP (2 CPU processes over gloo).

Each DDP client is a script that Lightning starts again as its second rank; the other
parties are spawned processes, as in test_federation.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from tests.fedavg import parties

pytestmark = pytest.mark.slow
FAST = {"schedule_timeout": 120, "calculation_timeout": 120}
DDP = {**FAST, "strategy": "ddp"}
TWO_CPUS = {"trainer": {"devices": 2, "accelerator": "cpu"}}
#: Each rank reads every other sample in order (Lightning's DistributedSampler shuffles).
STRIDED = {"trainer": {**TWO_CPUS["trainer"], "use_distributed_sampler": False}}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _run(
    fed: Any, folder: str, c1: dict[str, Any], c1_party: dict[str, Any]
) -> dict[str, torch.Tensor]:
    f = fed("c1", "c2", folder=folder)
    f.start("c1", "client", c1, {"data_seed": 1, **c1_party})
    f.start("c2", "client", FAST, {"data_seed": 2, "batch_size": 32})
    f.start("agg", "aggregator", {**FAST, "rounds": 3, "min_clients": 2})
    codes = f.wait(600)
    assert codes == {"c1": 0, "c2": 0, "agg": 0}, f.log("agg") + f.log("c1")
    report = f.report()
    assert all(r["samples"] == {"c1": 64, "c2": 64} for r in report["rounds"]), report["rounds"]
    return _weights(f.out("agg") / "final.safetensors")


def test_a_ddp_client_equals_one_process_on_the_union_of_its_ranks_batches(fed: Any) -> None:
    """2 ranks x batch 16 (rank r takes samples r, r + 2, ...) average the same
    gradients as one process with batch 32 of the same data in the same order."""
    single = _run(fed, "single", FAST, {"batch_size": 32})
    ddp = _run(fed, "ddp", DDP, {"batch_size": 16, "strided_ranks": True, **STRIDED})
    assert single.keys() == ddp.keys()
    for k in single:
        assert torch.allclose(single[k], ddp[k], atol=1e-5), (k, single[k] - ddp[k])
    assert not all(torch.equal(single[k], torch.zeros_like(single[k])) for k in single)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("raise_on_rank", "rank 1: RuntimeError: rank 1 ran out of memory in round 2"),
        ("die_on_rank", "rank 1 of this client's DDP processes was killed by SIGKILL"),
    ],
)
def test_a_failing_rank_aborts_the_federation_with_its_reason(
    fed: Any, how: str, reason: str
) -> None:
    f = fed("c1", "c2")
    fail = {"opts": {how: [2, 1]}, "batch_size": 16, **TWO_CPUS}
    f.start("c1", "client", DDP, fail)
    f.start("c2", "client", FAST, {"data_seed": 2})
    f.start("agg", "aggregator", {**FAST, "rounds": 4, "min_clients": 2})
    started = time.monotonic()
    codes = f.wait(600)
    took = time.monotonic() - started
    assert codes["c1"] != 0 and codes["c2"] != 0 and codes["agg"] != 0, codes
    said = f.log("agg")
    assert f"client c1 stopped with an error and leaves the federation: {reason}" in said, said
    assert reason in f.log("c2")  # the abort names it too
    assert took < FAST["calculation_timeout"], took  # told at once, not after a timeout


def test_recovery_with_a_ddp_client_the_client_carries_on(fed: Any) -> None:
    f = fed("c1", "c2")
    slow = {"opts": {"slow_in_round": 3, "slow_seconds": 3}, "batch_size": 16, **TWO_CPUS}
    f.start("c1", "client", DDP, slow)
    f.start("c2", "client", FAST, {"data_seed": 2})
    agg = {**FAST, "rounds": 5, "recovery": True, "min_clients": 2}
    first = f.start("agg", "aggregator", agg, key="agg-1")
    f.wait_for_log("agg", "round 3 started", timeout=300)
    os.kill(first.pid, signal.SIGKILL)
    first.join(10)
    f.start("agg", "aggregator", agg, key="agg-2")
    codes = f.wait(600)
    assert codes["agg-2"] == 0 and codes["c1"] == 0 and codes["c2"] == 0, f.log("agg")
    report = f.report()
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4, 5]
    assert all(r["samples"]["c1"] == 64 for r in report["rounds"])
    assert "resuming after round 2" in f.log("agg")


# -- the aggregator on 2 DDP ranks: it validates and tests its holdout's shards -------------
VAL = {"c1": (11, 48, 0.0), "c2": (12, 40, 0.5)}  # (seed, n, shift) of each client's data
TEST = {"c1": (21, 40, 0.0), "c2": (22, 48, -0.5)}


def _metrics(final: dict[str, torch.Tensor], *sets: TensorDataset) -> dict[str, float]:
    """The final model's accuracy and AUROC on the sets pooled, computed here."""
    from torchmetrics.functional.classification import binary_accuracy, binary_auroc

    model = parties.MetricNet()
    model.load_state_dict(final)
    x = torch.cat([d.tensors[0] for d in sets])
    y = torch.cat([d.tensors[1] for d in sets])
    with torch.no_grad():
        scores = model(x).softmax(dim=1)[:, 1]
    return {"acc": float(binary_accuracy(scores, y)), "auroc": float(binary_auroc(scores, y))}


def test_a_ddp_aggregator_validates_and_tests_its_whole_holdout(fed: Any) -> None:
    """Rank 0 runs the rounds; each of 2 ranks validates and tests half of the holdout
    with the same global model; torchmetrics' synchronised states (and a float logged
    with ``sync_dist``) give the metrics of the whole holdout, and the clients'
    evaluations merge on rank 0 as in one process."""
    f = fed("c1", "c2")
    for i, c in enumerate(("c1", "c2")):
        party = {"data_seed": i + 1, "model": "metrics", "val": VAL[c], "test": TEST[c]}
        f.start(c, "client", FAST, party)
    settings = {**DDP, "rounds": 3, "min_clients": 2, "evaluate_on_clients": True}
    f.start("agg", "aggregator", settings, {"model": "metrics", "collect_tests": True, **TWO_CPUS})
    codes = f.wait(600)
    assert codes == {"c1": 0, "c2": 0, "agg": 0}, f.log("agg") + f.log("c1")
    report = f.report()
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(r["samples"] == {"c1": 64, "c2": 64} for r in report["rounds"])
    final = _weights(f.out("agg") / "final.safetensors")
    holdout = _metrics(final, parties.dataset(999, 128))  # the aggregator's own data
    last = report["rounds"][-1]["metrics"]  # its validation of the final global model
    assert last["val_acc"] == pytest.approx(holdout["acc"], abs=1e-6)
    assert last["val_auroc"] == pytest.approx(holdout["auroc"], abs=1e-6)
    assert report["test_metrics"]["test_auroc"] == pytest.approx(holdout["auroc"], abs=1e-6)
    assert report["test_metrics"]["test_acc"] == pytest.approx(holdout["acc"], abs=1e-6)
    validated = _metrics(final, *(parties.noisy_dataset(*v) for v in VAL.values()))
    federated = report["final_federated_metrics"]
    assert federated["val_acc"] == pytest.approx(validated["acc"], abs=1e-6)
    assert federated["val_auroc"] == pytest.approx(validated["auroc"], abs=1e-6)
    assert all("federated_metrics" in r for r in report["rounds"])
    tested = _metrics(final, *(parties.noisy_dataset(*t) for t in TEST.values()))
    assert report["federated_test_clients"] == ["c1", "c2"]
    federated_test = report["federated_test_metrics"]["test_auroc"]
    assert federated_test == pytest.approx(tested["auroc"], abs=1e-6)
    theirs = json.loads((f.out("c1") / "report.json").read_text())
    assert theirs["test_metrics"] == report["test_metrics"]  # rank 0 published the report
    assert theirs["federated_test_metrics"] == report["federated_test_metrics"]


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("raise_on_rank", "rank 1: RuntimeError: rank 1 ran out of memory in round 2"),
        ("die_on_rank", "rank 1 of this aggregator's DDP processes was killed by SIGKILL"),
    ],
    ids=["raises", "killed"],
)
def test_a_failing_aggregator_rank_aborts_the_clients_with_its_reason(
    fed: Any, how: str, reason: str
) -> None:
    f = fed("c1", "c2")
    f.start("c1", "client", FAST, {"data_seed": 1})
    f.start("c2", "client", FAST, {"data_seed": 2})
    f.start(
        "agg",
        "aggregator",
        {**DDP, "rounds": 4, "min_clients": 2},
        {"opts": {how: [2, 1]}, **TWO_CPUS},
    )
    started = time.monotonic()
    codes = f.wait(600)
    took = time.monotonic() - started
    assert codes["c1"] != 0 and codes["c2"] != 0 and codes["agg"] != 0, codes
    for client in ("c1", "c2"):
        assert reason in f.log(client), f.log(client)
    assert took < FAST["calculation_timeout"], took  # told at once, not after a timeout


def test_secure_aggregation_with_a_ddp_client_equals_plain_fedavg(fed: Any) -> None:
    """Only rank 0 of a DDP client runs secure aggregation's steps; what it masks is the
    model its ranks trained together. The secure round's model equals plain FedAvg's
    with that client in one process (within the quantisation bound)."""
    from lightning_fed.privacy import SecureAggregation

    secure = SecureAggregation(clip=0.5, bits=20, timeout=120)

    def run(folder: str, c1: dict[str, Any], c1_party: dict[str, Any], agg: dict[str, Any]) -> Any:
        f = fed("c1", "c2", "c3", folder=folder)
        f.start("c1", "client", c1, {"data_seed": 1, **c1_party})
        f.start("c2", "client", FAST, {"data_seed": 2, "batch_size": 32})
        f.start("c3", "client", FAST, {"data_seed": 3, "batch_size": 32})
        f.start("agg", "aggregator", {**FAST, "rounds": 1, "min_clients": 3, **agg})
        codes = f.wait(600)
        assert codes == {"c1": 0, "c2": 0, "c3": 0, "agg": 0}, f.log("agg") + f.log("c1")
        return f

    plain = run("plain", FAST, {"batch_size": 32}, {})
    masked = run(
        "secure",
        DDP,
        {"batch_size": 16, "strided_ranks": True, **STRIDED},
        {"secure_aggregation": secure},
    )
    assert "secure aggregation among c1, c2, c3" in masked.log("agg")
    want = _weights(plain.out("agg") / "final.safetensors")
    got = _weights(masked.out("agg") / "final.safetensors")
    bound = 0.5 / (2**20 - 1)
    for k in want:
        err = float((got[k].double() - want[k].double()).abs().max())
        assert err <= bound * 1.01 + 1e-5, (k, err)
