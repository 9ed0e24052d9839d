"""Differential privacy in real federations: Trainers in their own processes, Opacus'
accountants and DP-SGD, real crypto for the distributed mode.

Every check reads what the parties left behind (final weights, report.json, logs,
the CSV logger's metrics) and compares it with what the settings promise: the noise's
spread, the clipping bound, the library's epsilon, a stop at the target.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lightning_fed.privacy import (
    Accountant,
    AdaptiveClipping,
    DifferentialPrivacy,
    LocalDP,
    SecureAggregation,
    noise_multiplier_for,
)
from tests.fedavg.parties import TinyNet
from tests.privacy.federations import CLIENTS, FAST, run

pytestmark = pytest.mark.slow


def initial_model() -> dict[str, torch.Tensor]:
    """The aggregator's model before round 1 (its party seeds 0 before building it)."""
    L.seed_everything(0, verbose=False)
    return {k: v.clone() for k, v in TinyNet().state_dict().items()}


def change(path: Path) -> torch.Tensor:
    """The final global model minus the initial one, as one float64 vector."""
    final, start = load_file(str(path)), initial_model()
    assert set(final) == set(start)
    return torch.cat([(final[k].double() - start[k].double()).reshape(-1) for k in sorted(start)])


def noise_range(clip: float, z: float, smallest_round: int) -> float:
    """A secure-aggregation clip that holds a clipped coordinate plus 4 std of one
    client's noise share in the smallest round allowed (std z * clip / sqrt(m))."""
    return round(clip * (1 + 4 * z / math.sqrt(smallest_round)) + 0.1, 1)


def ok(f: Any, nodes: list[str]) -> None:
    codes = f.wait()
    assert codes == {n: 0 for n in nodes}, "".join(f.log(n)[-3000:] for n in nodes)


def test_central_dp_noise_has_the_promised_spread_and_epsilon_is_the_librarys(
    fed: Any,
) -> None:
    """Clients that do not learn (lr 0): the global model moves by the noise alone, of
    std noise_multiplier * clip / clients per round; epsilon after each round is the
    accountant's for (z, q=1, rounds), logged with the round as the step and in
    report.json."""
    z, clip = 3.0, 1.0
    f = run(
        fed,
        "central",
        2,
        {"differential_privacy": DifferentialPrivacy(noise_multiplier=z, clip=clip)},
        party={"lr": 0.0},
        agg_party={"csv_logger": True},
    )
    ok(f, [*CLIENTS, "agg"])
    moved = change(f.out("agg") / "final.safetensors")
    want = z * clip / len(CLIENTS) * math.sqrt(2)  # two rounds of noise
    # 74 coordinates: the sample std is within 40% of the true one with odds of ~1e-6
    # against; a noise of z * clip (5x) or of z * clip / sqrt(m) (2.2x) fails.
    assert 0.6 * want <= float(moved.std()) <= 1.4 * want, float(moved.std())
    report = f.report()
    spent = [r["privacy"]["epsilon"] for r in report["rounds"]]
    for n, eps in enumerate(spent, start=1):
        acc = Accountant()
        acc.step(z, 1.0, n)
        assert eps == pytest.approx(acc.epsilon(1e-5), rel=1e-9)
    assert report["privacy"]["mode"] == "central"
    assert report["privacy"]["epsilon"] == pytest.approx(spent[-1])
    rows = list(csv.DictReader((f.root / "agg" / "csv" / "metrics.csv").open()))
    logged = {int(r["step"]): float(r["dp/epsilon"]) for r in rows if r.get("dp/epsilon")}
    assert logged == pytest.approx({1: spent[0], 2: spent[1]})
    assert "differential privacy spent epsilon=" in f.log("agg")


def test_clipping_bounds_every_update_and_distributed_dp_matches_central_dp(fed: Any) -> None:
    """Clients that learn fast (lr 2) and a clip of 0.05, no noise: the round moves the
    global model by the mean of clipped changes, at most 0.05. With secure aggregation
    the clients clip their own updates and the masked sum gives the same model (within
    the quantisation bound)."""
    dp = DifferentialPrivacy(noise_multiplier=0.0, clip=0.05)
    central = run(fed, "central", 1, {"differential_privacy": dp}, party={"lr": 2.0})
    ok(central, [*CLIENTS, "agg"])
    moved = change(central.out("agg") / "final.safetensors")
    assert 0.02 <= float(moved.norm()) <= 0.05 + 1e-6
    assert "promises no privacy" in central.log("agg")
    secure = SecureAggregation(clip=0.1, bits=20, timeout=120)
    distributed = run(
        fed,
        "distributed",
        1,
        {"differential_privacy": dp, "secure_aggregation": secure},
        party={"lr": 2.0},
    )
    ok(distributed, [*CLIENTS, "agg"])
    a = load_file(str(central.out("agg") / "final.safetensors"))
    b = load_file(str(distributed.out("agg") / "final.safetensors"))
    for k in a:
        assert (a[k].double() - b[k].double()).abs().max() <= 0.1 / (2**20 - 1) * 1.01 + 1e-7, k
    assert distributed.report()["privacy"]["mode"] == "distributed"


def test_distributed_dp_noise_from_a_target_epsilon(fed: Any) -> None:
    """Secure aggregation with DP set by a target epsilon: the aggregator picks the
    noise for the planned rounds (Opacus' value), each client adds its share, and the
    sum carries the full noise (std z * clip / clients per round on the mean)."""
    target, clip = 20.0, 1.0
    dp = DifferentialPrivacy(target_epsilon=target, clip=clip)
    z = noise_multiplier_for(target, 1e-5, 1.0, 2)
    secure = SecureAggregation(clip=noise_range(clip, z, 5), bits=24)
    f = run(
        fed,
        "target",
        2,
        {"differential_privacy": dp, "secure_aggregation": secure, "min_clients": 5},
        party={"lr": 0.0},
    )
    ok(f, [*CLIENTS, "agg"])
    report = f.report()
    assert report["privacy"]["noise_multiplier"] == pytest.approx(z)
    assert report["rounds_completed"] == 2
    assert report["privacy"]["epsilon"] <= target
    moved = change(f.out("agg") / "final.safetensors")
    want = z * clip / len(CLIENTS) * math.sqrt(2)
    assert 0.6 * want <= float(moved.std()) <= 1.4 * want, (float(moved.std()), want)


def test_distributed_dp_accounts_for_the_noise_a_dropout_took_with_it(fed: Any) -> None:
    """c5 is killed after the key exchange, before masking: its share of the noise is
    not in the sum. The round still finishes over c1..c4, the report's noise multiplier
    is the noise actually summed (z * sqrt(4/5)) and epsilon is the accountant's for it;
    the mean of the four carries z * clip * sqrt(4/5) / 4 per coordinate."""
    z, clip = 2.0, 1.0
    dp = DifferentialPrivacy(noise_multiplier=z, clip=clip)
    secure = SecureAggregation(clip=noise_range(clip, z, 3), bits=24)  # min_clients 3
    f = run(
        fed,
        "dropout",
        1,
        {"differential_privacy": dp, "secure_aggregation": secure, "min_clients": 3},
        party={"lr": 0.0},
        parties={"c5": {"sabotage": [("secagg-check", 1, "die_after")]}},
    )
    codes = f.wait()
    assert codes == {**{n: 0 for n in [*CLIENTS, "agg"]}, "c5": -9}, f.log("agg")
    round1 = f.report()["rounds"][0]
    assert round1["missing"] == ["c5"]
    effective = z * math.sqrt(4 / 5)
    assert round1["privacy"]["noise_multiplier"] == pytest.approx(effective, rel=1e-12)
    acc = Accountant()
    acc.step(effective, 1.0)
    assert round1["privacy"]["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-9)
    everyone = Accountant()  # had c5's noise been summed too, less would be spent
    everyone.step(z, 1.0)
    assert f.report()["privacy"]["epsilon"] > everyone.epsilon(1e-5)
    moved = change(f.out("agg") / "final.safetensors")
    want = effective * clip / 4
    assert 0.6 * want <= float(moved.std()) <= 1.4 * want, (float(moved.std()), want)


@pytest.mark.parametrize(("lr", "fits"), [(2.0, False), (0.0, True)])
def test_adaptive_clipping_under_secure_aggregation_counts_in_the_masked_sum(
    fed: Any, lr: float, fits: bool
) -> None:
    """Distributed DP with adaptive clipping: each client sends whether its update fit
    the clip (centred, plus its share of the count's noise) inside its masked vector.
    Clients that learn fast (lr 2) never fit the tiny first clip, clients that do not
    learn (lr 0) always fit it: the secure sum's fraction (noise std 0.5 / 5 = 0.1 on
    it) says so every round, the clip follows the geometric rule from it, epsilon is
    the accountant's for the whole noise multiplier, and the count does not reach the
    model."""
    z, rate = 0.5, 0.5
    adaptive = AdaptiveClipping(initial=1e-4, learning_rate=rate, count_stddev=0.5)
    dp = DifferentialPrivacy(noise_multiplier=z, clip=adaptive)
    secure = SecureAggregation(clip=2.0, bits=24, timeout=120)
    f = run(
        fed,
        "adaptive-secure",
        3,
        {"differential_privacy": dp, "secure_aggregation": secure, "min_clients": 3},
        party={"lr": lr},
    )
    ok(f, [*CLIENTS, "agg"])
    report = f.report()
    assert report["privacy"]["mode"] == "distributed"
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for n, r in enumerate(rounds, start=1):
        fraction = r["privacy"]["unclipped_fraction"]
        assert (fraction > 0.5) == fits, (n, fraction)  # 5 standard deviations away
        acc = Accountant()
        acc.step(z, 1.0, n)
        assert r["privacy"]["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-9)
    assert rounds[0]["privacy"]["clip"] == pytest.approx(1e-4)
    for before, after in itertools.pairwise(rounds):
        p = before["privacy"]
        want = p["clip"] * math.exp(-rate * (p["unclipped_fraction"] - 0.5))
        assert after["privacy"]["clip"] == pytest.approx(want, rel=1e-9)
    change(f.out("agg") / "final.safetensors")  # the model's tensors, nothing else


def test_a_target_epsilon_stops_the_run_before_it_is_exceeded(fed: Any) -> None:
    z = 2.0
    acc = Accountant()
    acc.step(z, 1.0, 2)
    after_two = acc.epsilon(1e-5)
    acc.step(z, 1.0)
    target = (after_two + acc.epsilon(1e-5)) / 2  # a third round would exceed it
    clients = CLIENTS[:3]
    dp = DifferentialPrivacy(noise_multiplier=z, clip=1.0, target_epsilon=target)
    f = run(fed, "stop", 10, {"differential_privacy": dp}, clients=clients)
    ok(f, [*clients, "agg"])
    report = f.report()
    assert report["rounds_completed"] == 2
    assert report["privacy"]["epsilon"] == pytest.approx(after_two)
    assert f"stopping after round 2: target_epsilon={target:g} reached" in f.log("agg")
    for c in clients:
        assert "federation finished" in f.log(c)


def test_an_aggregator_restarted_after_its_budget_is_spent_runs_no_more_rounds(
    fed: Any,
) -> None:
    """The run stops at its target after round 2; the aggregator started again on the
    same folder (recovery on, the same settings, rounds left to run) finds the budget
    spent in its ledger and stops before any round, saying why: epsilon stays at round
    2's."""
    z = 2.0
    acc = Accountant()
    acc.step(z, 1.0, 2)
    after_two = acc.epsilon(1e-5)
    acc.step(z, 1.0)
    target = (after_two + acc.epsilon(1e-5)) / 2
    clients = CLIENTS[:3]
    dp = DifferentialPrivacy(noise_multiplier=z, clip=1.0, target_epsilon=target)
    agg = {"rounds": 10, "recovery": True, "differential_privacy": dp}
    f = run(fed, "spent", 10, agg, clients=clients)
    ok(f, [*clients, "agg"])
    assert f.report()["rounds_completed"] == 2
    before = f.log("agg")
    again = f.start("agg", "aggregator", {**FAST, **agg}, key="agg-again")
    again.join(240)
    assert again.exitcode == 0, f.log("agg")[len(before) :]
    after = f.log("agg")[len(before) :]
    assert f"no more rounds: target_epsilon={target:g} reached" in after, after
    assert "round 3 started" not in after
    report = f.report()
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["privacy"]["epsilon"] == pytest.approx(after_two)


def test_local_dp_sgd_counts_each_clients_epsilon_and_a_target_makes_it_leave(
    fed: Any,
) -> None:
    """Three clients with Opacus DP-SGD: each reports the epsilon of its own steps
    (sample rate 1 / its batches), as the library counts it; c3's target lets it train
    one round only, then it leaves and the others carry on."""
    z = 1.0
    clients = CLIENTS[:3]
    local = {"differential_privacy": LocalDP(noise_multiplier=z, max_grad_norm=1.0)}
    acc = Accountant()
    acc.step(z, 1 / 4, 4)  # c3: 64 samples, batches of 16
    target = (acc.epsilon(1e-5) + acc.epsilon_after(1e-5, z, 1 / 4, 4)) / 2
    f = run(
        fed,
        "local",
        3,
        {"min_clients": 2},
        each={
            **{c: local for c in clients[:2]},
            "c3": {"differential_privacy": LocalDP(z, 1.0, target_epsilon=target)},
        },
        clients=clients,
    )
    ok(f, [*clients, "agg"])
    report = f.report()
    assert report["rounds_completed"] == 3
    for i, c in enumerate(clients[:2]):
        batches = math.ceil((32 + 16 * i) / 16)
        for n, entry in enumerate(report["rounds"], start=1):
            spent = Accountant()
            spent.step(z, 1 / batches, batches * n)
            assert entry["client_metrics"][c]["dp/epsilon"] == pytest.approx(
                spent.epsilon(1e-5), rel=1e-9
            )
    assert sorted(report["rounds"][1]["samples"]) == ["c1", "c2"]
    assert "LocalDP: target_epsilon=" in f.log("c3")
    assert "left the federation" in f.log("c3")
    assert "4 batches of Poisson-sampled, on average 16 per epoch" in f.log("c3")
    assert (f.root / "c1" / "fedavg" / "t" / "c1" / "state" / "local-dp-accountant.json").is_file()


def test_local_dp_clips_each_examples_gradient_and_refuses_batchnorm(fed: Any) -> None:
    """No noise and max_grad_norm 1e-4: every step moves the model by at most lr * 1e-4,
    so a round of 4 steps at lr 1 moves it by at most 4e-4 (plain training moves it by
    far more). The dataloader's own batches of 16 (with Poisson sampling a step divides
    a batch's clipped sum by the mean size, so a large batch moves further). A module
    with BatchNorm is refused up front, naming the layer."""
    clients = CLIENTS[:2]
    fixed = LocalDP(noise_multiplier=0.0, max_grad_norm=1e-4, poisson_sampling=False)
    dp = {"differential_privacy": fixed}
    f = run(fed, "clip", 1, {}, client=dp, party={"lr": 1.0}, clients=clients)
    ok(f, [*clients, "agg"])
    moved = float(change(f.out("agg") / "final.safetensors").norm())
    assert 0 < moved <= 4 * 1e-4 + 1e-7
    bn = fed("c1", folder="batchnorm")
    bn.start("c1", "client", {**FAST, **dp}, {"opts": {"batchnorm": True}})
    assert bn.wait(timeout=120) == {"c1": 1}
    log = bn.log("c1")
    assert "LocalDP cannot compute per-example gradients of TinyNet" in log
    assert "BatchNorm" in log and "GroupNorm" in log


def test_adaptive_clipping_and_the_privacy_spent_survive_an_aggregator_restart(fed: Any) -> None:
    """Adaptive clipping from a bound far below every update's norm; the aggregator is
    killed in round 3 and restarted with recovery. Every round's reported clip follows
    the geometric rule from the previous round's noised fraction (across the restart),
    and epsilon keeps counting from round 2's, as the accountant counts 1..5 rounds."""
    z, rate = 1.0, 0.5
    adaptive = AdaptiveClipping(initial=1e-4, learning_rate=rate, count_stddev=1.0)
    dp = DifferentialPrivacy(noise_multiplier=z, clip=adaptive)
    f = fed("c1", "c2")
    f.start("c1", "client", FAST, {"opts": {"slow_in_round": 3, "slow_seconds": 3}})
    f.start("c2", "client", FAST)
    agg = {**FAST, "rounds": 5, "recovery": True, "differential_privacy": dp}
    first = f.start("agg", "aggregator", agg, key="agg-1")
    f.wait_for_log("agg", "round 3 started")
    os.kill(first.pid, signal.SIGKILL)
    first.join(10)
    f.start("agg", "aggregator", agg, key="agg-2")
    codes = f.wait()
    assert codes == {"c1": 0, "c2": 0, "agg-1": -signal.SIGKILL, "agg-2": 0}, f.log("agg")
    rounds = f.report()["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    clips = [r["privacy"]["clip"] for r in rounds]
    assert clips[0] == pytest.approx(1e-4)
    for before, after in itertools.pairwise(rounds):
        p = before["privacy"]
        want = p["clip"] * math.exp(-rate * (p["unclipped_fraction"] - 0.5))
        assert after["privacy"]["clip"] == pytest.approx(want, rel=1e-9)
    for n, r in enumerate(rounds, start=1):
        acc = Accountant()
        acc.step(z, 1.0, n)
        assert r["privacy"]["epsilon"] == pytest.approx(acc.epsilon(1e-5), rel=1e-9)
    assert "resuming after round 2" in f.log("agg")


def test_local_dp_sgd_adds_noise_of_the_promised_size(fed: Any) -> None:
    """One client, plain SGD at lr 1, noise multiplier 50 with max_grad_norm 1 and
    batches of 16: each of its 2 steps moves every coordinate by noise of std
    50 * 1 / 16 (Opacus averages the noised sum over the batch), far above what the
    clipped gradients can move (a norm of at most 1 a step). The round's move has that
    spread times sqrt(2)."""
    z = 50.0
    dp = {"differential_privacy": LocalDP(noise_multiplier=z, max_grad_norm=1.0)}
    f = run(fed, "noise", 1, {}, client=dp, party={"lr": 1.0}, clients=["c1"])
    ok(f, ["c1", "agg"])
    moved = change(f.out("agg") / "final.safetensors")
    want = z * 1.0 / 16 * math.sqrt(2)
    assert 0.6 * want <= float(moved.std()) <= 1.4 * want, (float(moved.std()), want)


def test_local_dp_noise_is_independent_across_clients_that_seed_alike(fed: Any) -> None:
    """Four clients run one script: the same seed (seed_everything(0)), the same data.
    Opacus draws its noise from torch's global generator unless given one, so their
    noise would be the same (and known to anyone who knows the seed): the mean of their
    moves would keep the whole noise, std z / 16 * sqrt(2) a coordinate. Each client's
    own generator, seeded from os.urandom, makes it independent: std half of that. The
    sample std of 74 coordinates lies within 35% of the truth with odds of ~1e-4
    against; the shared noise would be 2x the expected value."""
    z = 50.0
    dp = {"differential_privacy": LocalDP(noise_multiplier=z, max_grad_norm=1.0)}
    four = ["c1", "c2", "c3", "c4"]
    f = run(
        fed,
        "alike",
        1,
        {"min_clients": 4},
        client=dp,
        party={"lr": 1.0, "data_seed": 1, "n": 32, "seed": 0},
        clients=four,
    )
    ok(f, [*four, "agg"])
    moved = change(f.out("agg") / "final.safetensors")
    shared = z * 1.0 / 16 * math.sqrt(2)
    want = shared / 2  # the mean of four independent draws
    assert 0.65 * want <= float(moved.std()) <= 1.35 * want, (float(moved.std()), want, shared)
