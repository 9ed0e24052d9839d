"""Secure aggregation in real federations: Trainers in their own processes, real crypto.

The aggregate of a secure round equals plain FedAvg's within the quantisation bound;
clients that drop out before or after masking leave a round that still finishes with
the right sum over the survivors; too many dropouts fail the round naming them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lightning_fed.privacy import SecureAggregation

pytestmark = pytest.mark.slow
FAST = {"schedule_timeout": 60, "calculation_timeout": 60}
CLIENTS = ["c1", "c2", "c3", "c4", "c5"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def run(
    fed: Any,
    folder: str,
    rounds: int,
    agg: dict[str, Any],
    client: dict[str, Any] | None = None,
    parties: dict[str, dict[str, Any]] | None = None,
) -> Any:
    f = fed(*CLIENTS, folder=folder)
    for i, c in enumerate(CLIENTS):
        f.start(
            c,
            "client",
            {**FAST, **(client or {})},
            {"data_seed": i + 1, "n": 32 + 16 * i, **(parties or {}).get(c, {})},
        )
    f.start("agg", "aggregator", {**FAST, "rounds": rounds, **agg})
    return f


def close(got: Path, want: Path, bound: float) -> None:
    a, b = weights(got), weights(want)
    assert set(a) == set(b)
    for name, w in b.items():
        err = (a[name].double() - w.double()).abs().max().item()
        assert err <= bound * 1.01 + 1e-7, (name, err, bound)


ALL = {c: 0 for c in [*CLIENTS, "agg"]}
SECURE = SecureAggregation(clip=0.5, bits=20, timeout=30)
BOUND = 0.5 / (2**20 - 1)


def test_the_secure_aggregate_is_plain_fedavgs_within_the_bound_even_without_a_survivor(
    fed: Any,
) -> None:
    """Plain FedAvg, secure aggregation, and secure aggregation where c4 is killed right
    after sending its masked update: all three make the same model (within the bound)."""
    plain = run(fed, "plain", 1, {})
    assert plain.wait() == ALL, plain.log("agg")
    masked = run(
        fed,
        "secure",
        1,
        {"secure_aggregation": SECURE},
        {"secure_aggregation": SecureAggregation()},
    )
    assert masked.wait() == ALL, masked.log("agg") + masked.log("c1")
    close(masked.out("agg") / "final.safetensors", plain.out("agg") / "final.safetensors", BOUND)
    report = masked.report()
    assert report["rounds"][0]["rejected"] == {}
    assert "secure aggregation among c1, c2, c3, c4, c5" in masked.log("agg")
    dropped = run(
        fed,
        "dropped",
        1,
        {"secure_aggregation": SECURE},
        parties={"c4": {"sabotage": [("update", 1, "die_after")]}},
    )
    codes = dropped.wait()
    assert codes == {**ALL, "c4": -9}, dropped.log("agg")
    assert sorted(dropped.report()["rounds"][0]["samples"]) == CLIENTS  # c4's update counts
    close(dropped.out("agg") / "final.safetensors", plain.out("agg") / "final.safetensors", BOUND)


def test_a_client_killed_before_masking_is_left_out_of_the_sum(fed: Any) -> None:
    """c5 is killed while training, after the key exchange: the round sums c1..c4, as
    plain FedAvg of c1..c4 does; its masks are taken out with its reconstructed key."""
    plain = fed("c1", "c2", "c3", "c4", folder="plain")
    for i, c in enumerate(plain.clients):
        plain.start(c, "client", FAST, {"data_seed": i + 1, "n": 32 + 16 * i})
    plain.start("agg", "aggregator", {**FAST, "rounds": 1})
    assert set(plain.wait().values()) == {0}, plain.log("agg")
    masked = run(
        fed,
        "secure",
        1,
        {"secure_aggregation": SECURE, "calculation_timeout": 20, "min_clients": 3},
        parties={"c5": {"opts": {"die_in_round": 1}}},
    )
    codes = masked.wait()
    assert codes == {**ALL, "c5": -9}, masked.log("agg")
    round1 = masked.report()["rounds"][0]
    assert round1["missing"] == ["c5"]
    close(masked.out("agg") / "final.safetensors", plain.out("agg") / "final.safetensors", BOUND)


def test_too_many_dropouts_fail_the_round_naming_them_and_abort_the_others(fed: Any) -> None:
    """Degree 4, threshold 3: a second neighbour gone after masking leaves 2 shares."""
    secure = SecureAggregation(clip=0.5, bits=20, timeout=10)
    f = run(
        fed,
        "secure",
        2,
        {"secure_aggregation": secure},
        parties={c: {"sabotage": [("update", 1, "die_after")]} for c in ("c4", "c5")},
    )
    codes = f.wait()
    assert codes["agg"] == 1 and codes["c4"] == codes["c5"] == -9
    assert codes["c1"] == codes["c2"] == codes["c3"] == 1
    log = f.log("agg")
    assert "secure aggregation cannot recover the sum: too few correct shares of c1's" in log
    assert "2 of its neighbours answered: c2, c3" in log
    assert "the aggregator 'agg' aborted the federation" in f.log("c1")
    assert not (f.out("agg") / "final.safetensors").exists()
