"""A FedAvg client that trains with Lightning's DDP (2 CPU processes over gloo).

Each DDP client is a script that Lightning starts again as its second rank; the other
parties are spawned processes, as in test_federation.py.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

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
