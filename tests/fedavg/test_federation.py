"""Whole federations in real processes: end to end, identities, failures, recovery.

Every party is a Lightning Trainer with FedAvgStrategy in its own spawned process,
over a local-directory channel.
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

from tests.fedavg import parties
from tests.processes import CTX

pytestmark = pytest.mark.slow

FAST = {"schedule_timeout": 60, "calculation_timeout": 60}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_end_to_end_clients_first_outputs_everywhere(fed: Any) -> None:
    f = fed("c1", "c2")
    for i, c in enumerate(f.clients):  # clients start before the aggregator and retry
        f.start(c, "client", FAST, {"data_seed": i + 1, "wait_test_report": True})
    time.sleep(3)
    f.start("agg", "aggregator", {**FAST, "rounds": 3})
    assert f.wait() == {"c1": 0, "c2": 0, "agg": 0}, f.log("agg")
    report = f.report()
    assert report["rounds_completed"] == 3
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(r["samples"] == {"c1": 64, "c2": 64} for r in report["rounds"])
    assert "val_acc" in report["final_metrics"] and "test_acc" in report["test_metrics"]
    final = _weights(f.out("agg") / "final.safetensors")
    for c in f.clients:  # every client holds the same final global model
        theirs = _weights(f.out(c) / "final.safetensors")
        assert all(torch.equal(final[k], theirs[k]) for k in final)
        theirs_report = json.loads((f.out(c) / "report.json").read_text())
        assert theirs_report["rounds_completed"] == 3
        assert theirs_report["test_metrics"] == report["test_metrics"]  # the final test too
    assert (f.out("agg") / "final.ckpt").is_file()


def test_end_to_end_over_s3(fed: Any, s3_endpoint: str) -> None:
    """The same federation over a real S3 endpoint (moto server on 127.0.0.1)."""
    import s3fs

    from lightning_fed.testing import make_bucket, s3_storage_options

    bucket = make_bucket(s3_endpoint)
    url = f"s3://{bucket}/federation"
    s3 = {**FAST, "storage_options": s3_storage_options(s3_endpoint)}
    f = fed("c1", "c2")
    for i, c in enumerate(f.clients):
        f.start(c, "client", s3, {"data_seed": i + 1, "url": url})
    f.start("agg", "aggregator", {**s3, "rounds": 2}, {"url": url})
    assert f.wait() == {"c1": 0, "c2": 0, "agg": 0}, f.log("agg") + f.log("c1")
    report = f.report()
    assert [r["samples"] for r in report["rounds"]] == [{"c1": 64, "c2": 64}] * 2
    final = _weights(f.out("agg") / "final.safetensors")
    for c in f.clients:
        theirs = _weights(f.out(c) / "final.safetensors")
        assert all(torch.equal(final[k], theirs[k]) for k in final)
    assert not (f.root / "channel").exists()  # everything went through the bucket
    stored = s3fs.S3FileSystem(**s3_storage_options(s3_endpoint)).find(f"{bucket}/federation")
    assert any("/t/inbox/" in k for k in stored) or any("/t/blobs/" in k for k in stored)


#: Lightning's loop across rounds: (Trainer arguments, TinyNet options) of the client.
LIGHTNING_LOOP = [
    pytest.param({}, {}, id="plain"),
    pytest.param(
        {"gradient_clip_val": 0.05, "accumulate_grad_batches": 2, "precision": "bf16-mixed"},
        {"scheduler": "step"},
        id="clipping-accumulation-bf16-step-scheduler",
    ),
    pytest.param(
        {"precision": "16-mixed"},
        {"manual": True},
        id="16-mixed-two-optimisers-manual-epoch-schedulers",
    ),
]


@pytest.mark.parametrize(("trainer", "opts"), LIGHTNING_LOOP)
def test_one_client_equals_plain_lightning(
    fed: Any, tmp_path: Path, trainer: dict[str, Any], opts: dict[str, Any]
) -> None:
    """R rounds x 1 epoch with one client == plain Lightning for R epochs (same order):
    Lightning's loop (precision, accumulation, clipping, several optimisers, schedulers
    of either interval, optimizer state) carries on across rounds as across epochs."""
    party = {"n": 50, "batch_size": 8, "lr": 0.05, "momentum": 0.9, "trainer": trainer}
    party["opts"] = opts
    f = fed("c1")
    f.start("c1", "client", FAST, party)
    f.start("agg", "aggregator", {**FAST, "rounds": 4})
    plain = CTX.Process(target=parties.run_plain, args=(str(tmp_path), 4, party))
    plain.start()
    plain.join(240)
    assert f.wait() == {"c1": 0, "agg": 0}, f.log("c1") + f.log("agg")
    assert plain.exitcode == 0
    expected = _weights(tmp_path / "plain.safetensors")
    for node in ("c1", "agg"):
        got = _weights(f.out(node) / "final.safetensors")
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_optimizer_state_reset_clears_the_state_each_round_and_schedulers_go_on(
    fed: Any,
) -> None:
    party = {"momentum": 0.9, "lr": 0.08, "opts": {"log_optimizer": True, "scheduler": "epoch"}}
    f = fed("c1")
    f.start("c1", "client", FAST, party)
    f.start("agg", "aggregator", {**FAST, "rounds": 3, "optimizer_state": "reset"})
    assert f.wait() == {"c1": 0, "agg": 0}, f.log("c1") + f.log("agg")
    rounds = [r["client_metrics"]["c1"] for r in f.report()["rounds"]]
    assert [m["optimizer_state_tensors"] for m in rounds] == [0, 0, 0]  # no momentum kept
    lrs = [m["lr_at_round_start"] for m in rounds]
    assert lrs == pytest.approx([0.08, 0.04, 0.02])  # halved per round


def test_clients_keep_their_checkpoints_loggers_and_early_stopping_which_leaves(
    fed: Any,
) -> None:
    """Lightning's callbacks and loggers on clients work across rounds; a client whose
    EarlyStopping stops its Trainer sends that round's update, then leaves at once; the
    aggregator's EarlyStopping ends the federation, and the clients get the model."""
    f = fed("c1", "c2")
    keeper = {
        "val": (101, 30, 0.0),
        "csv_logger": True,
        "callbacks": {"checkpoint": {"monitor": "val_loss", "save_top_k": 1, "save_last": True}},
    }
    f.start("c1", "client", FAST, {"data_seed": 1, **keeper})
    # Round 2 cannot improve train_loss by 10: patience 1 runs out after round 2.
    stopper = {"early_stopping": {"monitor": "train_loss", "min_delta": 10.0, "patience": 1}}
    f.start("c2", "client", FAST, {"data_seed": 2, "callbacks": stopper})
    # The aggregator's own EarlyStopping ends the federation after round 3 of 5.
    ends = {"early_stopping": {"monitor": "val_loss", "min_delta": 10.0, "patience": 2}}
    f.start("agg", "aggregator", {**FAST, "rounds": 5}, {"callbacks": ends})
    codes = f.wait()
    assert codes == {"c1": 0, "c2": 0, "agg": 0}, f.log("agg") + f.log("c2")
    report = f.report()
    assert report["rounds_completed"] == 3
    samples = [sorted(r["samples"]) for r in report["rounds"]]
    assert samples == [["c1", "c2"], ["c1", "c2"], ["c1"]]
    assert json.loads((f.out("c1") / "report.json").read_text())["rounds_completed"] == 3
    said = f.log("agg")
    assert "client c2 left the federation: its Trainer stopped after round 2 (EarlyStopping" in said
    assert "stopped with an error" not in said
    assert "left the federation" in f.log("c2")
    # c1's ModelCheckpoint kept its best round and the last; its CSVLogger a row per round.
    saved = sorted(p.name for p in (f.root / "c1").rglob("*.ckpt"))
    assert "last.ckpt" in saved and any(n.startswith("epoch=") for n in saved), saved
    rows = (f.root / "c1" / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [r.split(",")[header.index("train_loss")] for r in rows[1:]]
    assert len([v for v in losses if v]) == 3, rows  # one epoch-level row per round


def test_one_client_with_local_steps_equals_plain_lightning_max_steps(
    fed: Any, tmp_path: Path
) -> None:
    """R rounds x S steps == plain Lightning for R*S steps, across epoch boundaries.

    7 rounds of 5 steps on 7 batches per epoch: rounds end mid-epoch, except the last,
    which ends with epoch 5.
    """
    party = {"n": 50, "batch_size": 8, "lr": 0.05, "momentum": 0.9}  # 7 batches per epoch
    f = fed("c1")
    f.start("c1", "client", FAST, party)
    f.start("agg", "aggregator", {**FAST, "rounds": 7, "local_steps": 5})
    plain = CTX.Process(
        target=parties.run_plain, args=(str(tmp_path), -1, {**party, "max_steps": 35})
    )
    plain.start()
    plain.join(240)
    assert f.wait() == {"c1": 0, "agg": 0}, f.log("c1") + f.log("agg")
    assert plain.exitcode == 0
    rounds = f.report()["rounds"]
    batches = [8, 8, 8, 8, 8, 8, 2] * 5
    assert [r["samples"]["c1"] for r in rounds] == [
        sum(batches[i : i + 5]) for i in range(0, 35, 5)
    ]
    assert "train_loss" not in rounds[0]["client_metrics"]["c1"]  # no epoch had ended yet
    assert "train_loss" in rounds[6]["client_metrics"]["c1"]  # epoch 5's, ended with round 7
    expected = _weights(tmp_path / "plain.safetensors")
    for node in ("c1", "agg"):
        got = _weights(f.out(node) / "final.safetensors")
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_fedsgd_equals_one_centralised_full_batch_step(fed: Any) -> None:
    """K clients x one full-batch plain-SGD step, averaged == one step on the union."""
    sizes = [30, 50, 20]
    f = fed("c1", "c2", "c3")
    for i, c in enumerate(f.clients):
        f.start(c, "client", FAST, {"data_seed": i + 1, "n": sizes[i], "batch_size": sizes[i]})
    f.start("agg", "aggregator", {**FAST, "rounds": 1})
    assert f.wait() == {"c1": 0, "c2": 0, "c3": 0, "agg": 0}, f.log("agg")

    torch.manual_seed(0)  # the aggregator's initial model: seeded the same way
    import lightning.pytorch as L

    L.seed_everything(0, verbose=False)
    model = parties.TinyNet(lr=0.1)
    xs, ys = zip(*(parties.dataset(i + 1, n).tensors for i, n in enumerate(sizes)))
    x, y = torch.cat(xs), torch.cat(ys)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    got = _weights(f.out("agg") / "final.safetensors")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


def test_client_killed_mid_round_and_late_upload_rejected(fed: Any) -> None:
    f = fed("c1", "c2", "c3")
    f.start("c1", "client", FAST)
    f.start("c2", "client", FAST, {"opts": {"slow_in_round": 1, "slow_seconds": 8}})
    f.start("c3", "client", FAST, {"opts": {"die_in_round": 2}})
    agg = {**FAST, "rounds": 3, "min_clients": 1, "calculation_timeout": 5}
    f.start("agg", "aggregator", agg)
    codes = f.wait()
    assert codes["agg"] == 0 and codes["c1"] == 0, f.log("agg")
    assert codes["c3"] == -signal.SIGKILL
    rounds = {r["round"]: r for r in f.report()["rounds"]}
    assert rounds[1]["missing"] == ["c2"]  # too slow for round 1
    assert "c3" in rounds[2]["missing"]  # killed during round 2
    assert "c1" in rounds[3]["samples"]
    log = f.log("agg")
    assert "rejected the update of c2 (round 1)" in log  # the late upload, not averaged
    assert "belongs to round 1" in log


def test_partial_participation_follows_the_seeded_draw_and_idle_clients_wait(
    fed: Any,
) -> None:
    """One of 3 clients per round; c2 is never drawn (seed 1) yet stays to the finish.

    The 6 rounds outlast a client's wait for one instruction (calculation_timeout +
    schedule_timeout): c2 gets through only because the aggregator tells the clients it
    left out of a round to keep waiting. The clients check in before the aggregator
    starts, so schedule_timeout only has to cover the aggregator's start-up: twice
    the start-up measured on this machine now.
    """
    from lightning_fed.fedavg.selection import sample_clients

    f = fed("c1", "c2", "c3")
    draw = [sample_clients(f.clients, 1, seed=1, round=r) for r in range(1, 7)]
    assert all(d != ["c2"] for d in draw)
    schedule = max(12.0, 2 * f.startup_seconds(1))
    margin = 4.0  # a picked client's own training and upload
    per_round = (schedule + 2 * margin) / 4  # the picked client's round
    # 6 rounds last 1.5 (schedule + 2 margin) > the wait schedule + per_round + margin.
    timeouts = {"calculation_timeout": per_round + margin, "schedule_timeout": schedule}
    for c in f.clients:
        f.start(c, "client", timeouts, {"opts": {"slow_every_round": per_round}})
    for c in f.clients:
        f.wait_for_log(c, f"client {c}: checking in", timeout=300)
    f.start("agg", "aggregator", {**timeouts, "rounds": 6, "clients_per_round": 1, "seed": 1})
    assert f.wait() == {"agg": 0, "c1": 0, "c2": 0, "c3": 0}, f.log("agg") + f.log("c2")
    report = f.report()
    assert [sorted(r["samples"]) for r in report["rounds"]] == draw
    assert report["clients"] == ["c1", "c2", "c3"]
    assert "c2: not picked for round 6" in f.log("c2")
    assert (f.out("c2") / "final.safetensors").is_file()


def test_too_few_updates_fail_the_round_and_abort_clients(fed: Any) -> None:
    f = fed("c1", "c2")
    f.start("c1", "client", FAST)
    f.start("c2", "client", FAST, {"opts": {"die_in_round": 1}})
    f.start("agg", "aggregator", {**FAST, "rounds": 2, "min_clients": 2, "calculation_timeout": 4})
    codes = f.wait()
    assert codes["agg"] == 1 and codes["c1"] == 1
    assert "RoundFailedError" in f.log("agg") and "min_clients=2" in f.log("agg")
    # Killed without a word: its presence claim tells the aggregator it is gone.
    assert "c2 is gone: its process (pid" in f.log("agg")
    assert "aborted the federation" in f.log("c1")


def test_a_client_that_fails_is_dropped_at_once_with_its_reason(fed: Any) -> None:
    """c2's model does not fit the global weights: it says so, and nobody waits for it.

    The aggregator's calculation_timeout (900 s) is far beyond the test's wait, so the
    federation can only finish if c2's failure reached the aggregator at once.
    """
    f = fed("c1", "c2")
    slow = {"schedule_timeout": 120, "calculation_timeout": 900}
    f.start("c1", "client", slow)
    f.start("c2", "client", slow, {"opts": {"hidden": 16}})
    f.start("agg", "aggregator", {**slow, "rounds": 2, "min_clients": 1})
    codes = f.wait(timeout=240)
    assert codes == {"c1": 0, "c2": 1, "agg": 0}, f.log("agg") + f.log("c2")
    rounds = f.report()["rounds"]
    assert list(rounds[0]["samples"]) == ["c1"]
    assert "stopped with an error" in rounds[0]["rejected"]["c2"]
    assert "shape" in rounds[0]["rejected"]["c2"]  # the client's own reason
    assert list(rounds[1]["samples"]) == ["c1"] and rounds[1]["rejected"] == {}
    assert f.report()["clients"] == ["c1"]
    assert "client c2 stopped with an error and leaves the federation" in f.log("agg")


def test_a_client_that_fails_before_checking_in_is_not_waited_for(fed: Any) -> None:
    """c2 fails in its model's setup, before its channel opens: it still tells the aggregator.

    The aggregator's schedule_timeout (900 s) is far beyond the test's wait: it starts
    round 1 only because c2's failure reached it.
    """
    f = fed("c1", "c2")
    slow = {"schedule_timeout": 900, "calculation_timeout": 120}
    f.start("c1", "client", slow)
    f.start("c2", "client", slow, {"opts": {"fail_in_setup": True}})
    f.start("agg", "aggregator", {**slow, "rounds": 1, "min_clients": 1})
    codes = f.wait(timeout=240)
    assert codes == {"c1": 0, "c2": 1, "agg": 0}, f.log("agg") + f.log("c2")
    assert "client c2 stopped with an error and leaves the federation" in f.log("agg")
    assert "the data folder /data/hospital-b is missing" in f.log("agg")
    assert f.report()["clients"] == ["c1"]


def test_an_aggregator_that_fails_at_start_refuses_the_waiting_clients(fed: Any) -> None:
    f = fed("c1", "c2")
    slow = {"schedule_timeout": 900, "calculation_timeout": 120}
    for c in f.clients:
        f.start(c, "client", slow)
    for c in f.clients:
        f.wait_for_log(c, f"client {c}: checking in", timeout=300)
    f.start("agg", "aggregator", {**slow, "rounds": 2}, {"opts": {"fail_in_setup": True}})
    codes = f.wait(timeout=240)  # the clients would wait 900 s for an acknowledgement
    assert codes == {"c1": 1, "c2": 1, "agg": 1}, f.log("agg") + f.log("c1")
    for c in f.clients:
        said = f.log(c)
        assert "the aggregator 'agg' refused: the aggregator stopped: RuntimeError" in said
        assert "the data folder /data/hospital-b is missing" in said


def test_failures_below_min_clients_fail_the_round_at_once(fed: Any) -> None:
    f = fed("c1", "c2")
    slow = {"schedule_timeout": 120, "calculation_timeout": 900}
    f.start("c1", "client", slow, {"opts": {"slow_every_round": 1.0}})
    f.start("c2", "client", slow, {"opts": {"hidden": 16}})
    f.start("agg", "aggregator", {**slow, "rounds": 2, "min_clients": 2})
    codes = f.wait(timeout=240)
    assert codes == {"c1": 1, "c2": 1, "agg": 1}, f.log("agg")
    agg = f.log("agg")
    assert "RoundFailedError" in agg and "min_clients=2" in agg
    assert "c2: it stopped with an error" in agg and "shape" in agg
    assert "aborted the federation" in f.log("c1")


def test_nan_weights_rejected_round_goes_on(fed: Any) -> None:
    f = fed("c1", "c2")
    f.start("c1", "client", FAST)
    f.start("c2", "client", FAST, {"opts": {"nan_in_round": 1}})
    f.start("agg", "aggregator", {**FAST, "rounds": 2})
    codes = f.wait()
    assert codes["agg"] == 0, f.log("agg")
    r1 = f.report()["rounds"][0]
    assert list(r1["samples"]) == ["c1"]
    assert "NaN" in r1["rejected"]["c2"]
    assert "rejected the update of c2" in f.log("agg")
    final = _weights(f.out("agg") / "final.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())


def test_wrong_keys_shapes_dtypes_and_inf_rejected_naming_the_sender(fed: Any) -> None:
    """Four clients send broken tensors in round 2; the round goes on with the good one."""
    broken = {"c2": "shape", "c3": "dtype", "c4": "keys", "c5": "inf"}
    f = fed("c1", *broken)
    f.start("c1", "client", FAST)
    for node, how in broken.items():
        f.start(node, "client", FAST, {"tamper": (2, how)})
    f.start("agg", "aggregator", {**FAST, "rounds": 3, "min_clients": 1})
    assert f.wait() == {"c1": 0, **dict.fromkeys(broken, 0), "agg": 0}, f.log("agg")
    rounds = {r["round"]: r for r in f.report()["rounds"]}
    assert sorted(rounds[1]["samples"]) == ["c1", *broken]
    assert list(rounds[2]["samples"]) == ["c1"]  # averaged alone
    rejected = rounds[2]["rejected"]
    assert sorted(rejected) == sorted(broken)
    assert "net.0.weight: shape (3, 3), expected (8, 6)" in rejected["c2"]
    assert "net.0.bias: dtype torch.float64, expected torch.float32" in rejected["c3"]
    assert "missing tensors 'net.2.bias'" in rejected["c4"]
    assert "unexpected tensors 'net.9.weight'" in rejected["c4"]
    assert "net.2.weight: contains NaN or Inf" in rejected["c5"]
    assert sorted(rounds[3]["samples"]) == ["c1", *broken]  # they take part again
    log = f.log("agg")
    for node in broken:
        assert f"rejected the update of {node} (round 2): bad weights" in log
    final = _weights(f.out("agg") / "final.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in final.values())


def test_aggregator_killed_in_round_3_resumes_with_recovery(fed: Any) -> None:
    f = fed("c1", "c2")
    slow = {"opts": {"slow_in_round": 3, "slow_seconds": 3}}  # a window to kill in
    f.start("c1", "client", FAST, slow)
    f.start("c2", "client", FAST)
    agg = {**FAST, "rounds": 5, "recovery": True}
    first = f.start("agg", "aggregator", agg, key="agg-1")
    f.wait_for_log("agg", "round 3 started")
    os.kill(first.pid, signal.SIGKILL)
    first.join(10)
    assert first.exitcode == -signal.SIGKILL
    f.start("agg", "aggregator", agg, key="agg-2")
    codes = f.wait()
    assert codes["agg-2"] == 0 and codes["c1"] == 0 and codes["c2"] == 0, f.log("agg")
    report = f.report()
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4, 5]  # none lost or repeated
    assert "resuming after round 2" in f.log("agg")


def test_a_client_started_twice_the_second_is_refused_naming_the_first(fed: Any) -> None:
    f = fed("c1", "c2")
    go = f.root / "go"  # c2 holds round 2 until the second c1 has been refused
    f.start("c1", "client", FAST, key="c1-first")
    f.start("c2", "client", FAST, {"opts": {"hold_in_round": (2, str(go))}})
    f.start("agg", "aggregator", {**FAST, "rounds": 4, "calculation_timeout": 300})
    f.wait_for_log("agg", "round 2 started")
    f.start("c1", "client", FAST, key="c1-second")
    f.wait_for_log("c1", "already runs as instance", timeout=240)
    go.touch()
    codes = f.wait()
    assert codes == {"c1-first": 0, "c2": 0, "agg": 0, "c1-second": 1}, f.log("agg") + f.log("c1")
    said = f.log("c1")
    assert "NodeBusyError" in said and "node 'c1' of task 't' already runs as instance" in said
    assert "checked in again" not in f.log("agg")  # the second never reached the federation
    report = f.report()
    assert report["rounds_completed"] == 4
    assert all(sorted(r["samples"]) == ["c1", "c2"] for r in report["rounds"])


def test_an_aggregator_started_twice_the_second_is_refused_and_nothing_is_lost(fed: Any) -> None:
    f = fed("c1")
    go = f.root / "go"  # c1 holds round 2 until the second aggregator has been refused
    slow = {**FAST, "rounds": 4, "calculation_timeout": 300}
    f.start("c1", "client", slow, {"opts": {"hold_in_round": (2, str(go))}})
    f.start("agg", "aggregator", slow, key="agg-first")
    f.wait_for_log("agg", "round 2 started")
    f.start("agg", "aggregator", slow, key="agg-second")
    f.wait_for_log("agg", "already runs as instance", timeout=240)
    go.touch()
    codes = f.wait()
    assert codes == {"c1": 0, "agg-first": 0, "agg-second": 1}, f.log("agg")
    assert "node 'agg' of task 't' already runs as instance" in f.log("agg")
    assert "restarted round" not in f.log("c1")  # every round trained once
    assert f.report()["rounds_completed"] == 4
    final = _weights(f.out("agg") / "final.safetensors")  # the first's, untouched
    theirs = _weights(f.out("c1") / "final.safetensors")
    assert all(torch.equal(final[k], theirs[k]) for k in final)
