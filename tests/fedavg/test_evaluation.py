"""Federated evaluation: clients validate the global model; the aggregator merges exactly."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torchmetrics.functional.classification import binary_accuracy, binary_auroc

from lightning_fed.fedavg.evaluation import Evaluation, MetricState, merge
from tests.fedavg import parties

FAST = {"schedule_timeout": 60, "calculation_timeout": 60}
VAL = {"c1": (101, 30, -1.0), "c2": (102, 50, 0.0), "c3": (103, 70, 1.5)}  # seed, n, shift
TEST = {"c1": (201, 40, 1.0), "c2": (202, 25, -0.5), "c3": (203, 60, 0.0)}


def _pooled(final: dict[str, torch.Tensor], sets: dict[str, Any] = VAL) -> dict[str, Any]:
    model = parties.MetricNet()
    model.load_state_dict(final)
    per_client = {}
    scores, labels = [], []
    with torch.no_grad():
        for c, spec in sets.items():
            x, y = parties.noisy_dataset(*spec).tensors
            s = model(x).softmax(dim=1)[:, 1]
            per_client[c] = (float(binary_auroc(s, y)), len(y))
            scores.append(s)
            labels.append(y)
    s, y = torch.cat(scores), torch.cat(labels)
    weighted = sum(a * n for a, n in per_client.values()) / sum(n for _, n in per_client.values())
    return {
        "acc": float(binary_accuracy(s, y)),
        "auroc": float(binary_auroc(s, y)),
        "weighted_auroc": weighted,
    }


@pytest.mark.slow
@pytest.mark.parametrize("c3_ddp", [False, True], ids=["one-process", "c3-on-2-ddp-ranks"])
def test_federated_accuracy_and_auroc_equal_the_pooled_metrics_with_a_data_less_aggregator(
    fed: Any, c3_ddp: bool
) -> None:
    """With c3 on two DDP ranks each rank evaluates half of c3's data: the Metric states
    are synchronised across the ranks before they are sent, and stay exact."""
    f = fed("c1", "c2", "c3")
    for i, c in enumerate(f.clients):
        party = {"data_seed": i + 1, "model": "metrics", "val": VAL[c], "test": TEST[c]}
        if c == "c3" and c3_ddp:
            party["trainer"] = {"devices": 2, "accelerator": "cpu"}
            f.start(c, "client", {**FAST, "strategy": "ddp"}, party)
            continue
        f.start(c, "client", FAST, party)
    agg = {**FAST, "rounds": 2, "evaluate_on_clients": True}
    f.start("agg", "aggregator", agg, {"model": "metrics", "no_data": True})
    assert f.wait() == {"c1": 0, "c2": 0, "c3": 0, "agg": 0}, f.log("agg") + f.log("c1")
    report = f.report()
    final = report["final_federated_metrics"]
    pooled = _pooled(load_file(str(f.out("agg") / "final.safetensors")))
    assert final["val_acc"] == pytest.approx(pooled["acc"], abs=1e-6)
    assert final["val_auroc"] == pytest.approx(pooled["auroc"], abs=1e-6)
    # The float fallback is the sample-weighted mean of the clients' AUROCs: not the AUROC.
    # (Under DDP c3's float is rank 0's AUROC of its half, as the docs warn.)
    if not c3_ddp:
        assert final["val_auroc_plain"] == pytest.approx(pooled["weighted_auroc"], abs=1e-6)
    assert abs(pooled["weighted_auroc"] - pooled["auroc"]) > 1e-3
    last = report["rounds"][-1]
    assert sorted(last["federated_exact"]) == ["val_acc", "val_auroc"]
    assert last["federated_clients"] == ["c1", "c2", "c3"]
    assert report["final_metrics"] == final  # the aggregator has no data of its own
    assert set(report["initial_federated_metrics"]) >= {"val_acc", "val_auroc"}  # round 0
    assert "federated_metrics" in report["rounds"][0]  # round 1's model, validated in round 2
    assert "validated the global model of round 2" in f.log("c2")
    # The final test, federated: each client tests the final model on its own test data.
    tested = _pooled(load_file(str(f.out("agg") / "final.safetensors")), TEST)
    assert report["federated_test_metrics"]["test_auroc"] == pytest.approx(
        tested["auroc"], abs=1e-6
    )
    assert report["federated_test_exact"] == ["test_auroc"]  # test_acc: a float, weighted
    assert report["federated_test_metrics"]["test_acc"] == pytest.approx(tested["acc"], abs=1e-6)
    assert report["federated_test_clients"] == ["c1", "c2", "c3"]
    theirs = json.loads((f.out("c1") / "report.json").read_text())
    assert theirs["federated_test_metrics"] == report["federated_test_metrics"]


def test_merge_falls_back_to_the_weighted_mean_when_a_state_does_not_fit() -> None:
    from torchmetrics.classification import BinaryAccuracy

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.acc = BinaryAccuracy()

    def state(tp: int, n: int) -> MetricState:
        tensors = {k: torch.tensor(0) for k in BinaryAccuracy().metric_state}
        tensors["tp"], tensors["tn"] = torch.tensor(tp), torch.tensor(0)
        tensors["fp"], tensors["fn"] = torch.tensor(0), torch.tensor(n - tp)
        return MetricState("acc", "BinaryAccuracy", tensors)

    good = [
        ("a", Evaluation(1, 10, {"val_acc": 0.2}, {"val_acc": state(2, 10)})),
        ("b", Evaluation(1, 30, {"val_acc": 0.9}, {"val_acc": state(27, 30)})),
    ]
    merged, exact = merge(Holder(), good)
    assert merged["val_acc"] == pytest.approx(29 / 40) and exact == ["val_acc"]
    wrong = [good[0], ("b", Evaluation(1, 30, {"val_acc": 0.9}, {}))]  # b sent no state
    merged, exact = merge(Holder(), wrong)
    assert merged["val_acc"] == pytest.approx((0.2 * 10 + 0.9 * 30) / 40) and exact == []
    moved = [("a", Evaluation(1, 10, {"val_acc": 0.2}, {"val_acc": state(2, 10)}))]
    moved[0][1].states["val_acc"].cls = "SomethingElse"  # not the aggregator's metric class
    assert merge(Holder(), moved)[1] == []
