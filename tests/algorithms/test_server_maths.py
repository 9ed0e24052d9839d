"""Server-side maths against reference implementations written from the papers.

The references below are written from the equations (Reddi et al. 2021, Algorithm 2;
Hsu et al. 2019; Karimireddy et al. 2020, Algorithm 1), not from the package's code.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_fed.algorithms import (
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ModelSpec,
    Scaffold,
    Statistic,
    TensorSpec,
)
from lightning_fed.algorithms.base import Algorithm

NAMES = ("w", "b", "bn.running_mean", "bn.num_batches_tracked")
TRAINABLE = frozenset({"w", "b"})


def spec() -> ModelSpec:
    tensors = {
        "w": TensorSpec((3, 2), torch.float32),
        "b": TensorSpec((2,), torch.float32),
        "bn.running_mean": TensorSpec((2,), torch.float32),
        "bn.num_batches_tracked": TensorSpec((), torch.int64),
    }
    return ModelSpec(tensors, TRAINABLE)


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 2, generator=g),
        "b": torch.randn(2, generator=g),
        "bn.running_mean": torch.randn(2, generator=g),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


def rounds(count: int = 4, clients: int = 3) -> list[list[tuple[dict[str, torch.Tensor], int]]]:
    return [[(state(100 * r + c), 10 + 7 * c) for c in range(clients)] for r in range(count)]


def fold(algorithm: Algorithm, updates: list[tuple[dict[str, torch.Tensor], int]]) -> Statistic:
    stat = algorithm.statistic()
    for i, (s, n) in enumerate(updates):
        stat.add(ClientUpdate(f"c{i}", s, n))
    return stat


def weighted_mean(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    total = sum(n for _, n in updates)
    out = {}
    for k in NAMES:
        acc = sum(s[k].double() * n for s, n in updates) / total
        out[k] = acc.round().long() if k.endswith("tracked") else acc.float()
    return out


def run(algorithm: Algorithm, x0: dict[str, torch.Tensor], count: int) -> list[dict]:
    algorithm.setup(spec(), clients=3)
    x, seen = dict(x0), []
    for updates in rounds(count):
        x = algorithm.server_update(x, fold(algorithm, updates).result())
        seen.append(x)
    return seen


def reference_adaptive(kind: str, lr: float, b1: float, b2: float, tau: float, count: int) -> list:
    """Reddi et al. 2021, Algorithm 2 (m_{-1} = 0, v_{-1} = tau^2), on w and b only."""
    x = state(0)
    m = {k: 0.0 * x[k] for k in TRAINABLE}
    v = {k: torch.full_like(x[k], tau * tau) for k in TRAINABLE}
    out = []
    for updates in rounds(count):
        mean = weighted_mean(updates)
        new = dict(mean)  # buffers take the mean
        for k in TRAINABLE:
            delta = mean[k] - x[k]
            m[k] = b1 * m[k] + (1 - b1) * delta
            if kind == "adagrad":
                v[k] = v[k] + delta**2
            elif kind == "adam":
                v[k] = b2 * v[k] + (1 - b2) * delta**2
            else:  # yogi
                v[k] = v[k] - (1 - b2) * delta**2 * torch.sign(v[k] - delta**2)
            new[k] = x[k] + lr * m[k] / (torch.sqrt(v[k]) + tau)
        x = new
        out.append(x)
    return out


def assert_states(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for k in w:
            assert g[k].dtype == w[k].dtype, k
            torch.testing.assert_close(g[k], w[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("algorithm", "kind"),
    [
        (FedAdam(lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2), "adam"),
        (FedYogi(lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2), "yogi"),
        (FedAdagrad(lr=0.05, beta1=0.8, tau=1e-2), "adagrad"),
    ],
    ids=["adam", "yogi", "adagrad"],
)
def test_adaptive_server_optimisers_follow_reddi_algorithm_2(
    algorithm: Algorithm, kind: str
) -> None:
    p = algorithm.params()
    want = reference_adaptive(kind, p["lr"], p["beta1"], p.get("beta2", 0.0), p["tau"], 4)
    assert_states(run(algorithm, state(0), 4), want)


def test_fedavgm_is_server_momentum_on_the_pseudo_gradient() -> None:
    lr, beta = 0.7, 0.9
    x, velocity, want = state(0), {k: torch.zeros_like(state(0)[k]) for k in TRAINABLE}, []
    for updates in rounds(4):
        mean = weighted_mean(updates)
        new = dict(mean)
        for k in TRAINABLE:
            velocity[k] = beta * velocity[k] + (mean[k] - x[k])
            new[k] = x[k] + lr * velocity[k]
        x = new
        want.append(x)
    assert_states(run(FedAvgM(lr=lr, momentum=beta), state(0), 4), want)


def test_fedavgm_without_momentum_and_with_lr_1_is_fedavg() -> None:
    got = run(FedAvgM(lr=1.0, momentum=0.0), state(0), 3)
    want = run(FedAvg(), state(0), 3)
    assert_states(got, want)


def test_fedavg_is_the_sample_weighted_mean_with_buffers_rounded() -> None:
    got = run(FedAvg(), state(0), 2)
    assert_states(got, [weighted_mean(u) for u in rounds(2)])


def test_the_global_state_given_to_the_server_update_is_never_modified() -> None:
    for algorithm in (FedAdam(), FedYogi(), FedAdagrad(), FedAvgM(), Scaffold(lr=0.5)):
        algorithm.setup(spec(), clients=3)
        x = state(0)
        before = {k: v.clone() for k, v in x.items()}
        stat = fold(algorithm, rounds(1)[0])
        if isinstance(algorithm, Scaffold):
            stat = algorithm.statistic()
            for i, (s, n) in enumerate(rounds(1)[0]):
                stat.add(ClientUpdate(f"c{i}", s, n, {f"dc/{k}": s[k] for k in TRAINABLE}))
        algorithm.server_update(x, stat.result())
        assert all(torch.equal(x[k], before[k]) for k in x), type(algorithm).__name__


def test_server_state_survives_a_checkpoint_round_trip(tmp_path) -> None:
    """Moments saved after round 2 and loaded into a new instance give the same round 3."""
    for make in (FedAdam, FedYogi, FedAdagrad, FedAvgM):
        first = make()
        first.setup(spec(), clients=3)
        x = state(0)
        for updates in rounds(2):
            x = first.server_update(x, fold(first, updates).result())
        path = tmp_path / f"{make.__name__}.pt"
        torch.save(first.state_dict(), path)
        second = make()
        second.setup(spec(), clients=3)
        second.load_state_dict(torch.load(path, weights_only=True))
        third = rounds(3)[2]
        a = first.server_update(x, fold(first, third).result())
        b = second.server_update(x, fold(second, third).result())
        assert all(torch.equal(a[k], b[k]) for k in a), make.__name__


def test_scaffold_server_control_moves_by_the_participation_share() -> None:
    """Karimireddy et al. (Alg. 1, lines 16-17): x += lr_g * mean(dy); c += |S|/N mean(dc)."""
    lr, total = 0.5, 5
    algorithm = Scaffold(lr=lr)
    algorithm.setup(spec(), clients=total)
    x = state(0)
    c = {k: torch.zeros_like(x[k]) for k in TRAINABLE}
    for r, updates in enumerate(rounds(3, clients=2)):
        changes = [{k: state(900 + 10 * r + i)[k] for k in TRAINABLE} for i in range(2)]
        sent = algorithm.round_tensors()
        assert all(torch.equal(sent[f"c/{k}"], c[k]) for k in TRAINABLE)
        stat = algorithm.statistic()
        for i, ((s, n), dc) in enumerate(zip(updates, changes, strict=True)):
            stat.add(ClientUpdate(f"c{i}", s, n, {f"dc/{k}": v for k, v in dc.items()}))
        new = algorithm.server_update(x, stat.result())
        mean = weighted_mean(updates)
        for k in TRAINABLE:
            torch.testing.assert_close(new[k], x[k] + lr * (mean[k] - x[k]))
            c[k] = c[k] + (2 / total) * (changes[0][k] + changes[1][k]) / 2
        assert torch.equal(new["bn.num_batches_tracked"], mean["bn.num_batches_tracked"])
        x = new
    final = algorithm.round_tensors()
    for k in TRAINABLE:
        torch.testing.assert_close(final[f"c/{k}"], c[k])


def test_statistics_merge_as_if_every_update_was_added_to_one() -> None:
    updates = rounds(1, clients=5)[0]
    whole = fold(FedAvg(), updates).result()
    left, right = fold(FedAvg(), updates[:2]), fold(FedAvg(), updates[2:])
    left.merge(right)
    merged = left.result()
    assert merged.clients == whole.clients == 5
    assert merged.samples == whole.samples == sum(n for _, n in updates)
    for k in NAMES:
        torch.testing.assert_close(merged.mean[k], whole.mean[k])


def test_pseudo_gradient_steps_only_trainable_tensors() -> None:
    algorithm = FedAdam(lr=1.0)
    algorithm.setup(spec(), clients=3)
    updates = rounds(1)[0]
    new = algorithm.server_update(state(0), fold(algorithm, updates).result())
    mean = weighted_mean(updates)
    assert torch.equal(new["bn.running_mean"], mean["bn.running_mean"])
    assert not torch.allclose(new["w"], mean["w"])  # a step of size ~lr, not the mean


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FedAdam(lr=0), "lr must be a finite number > 0"),
        (lambda: FedAdam(beta1=1.0), "beta1 must be a finite number >= 0 and < 1"),
        (lambda: FedYogi(tau=-1), "tau must be a finite number > 0"),
        (lambda: FedAvgM(momentum=math.nan), "momentum must be a finite number"),
        (lambda: FedAdagrad(lr=True), "lr must be a finite number"),  # type: ignore[arg-type]
        (lambda: Scaffold(lr="1"), "lr must be a finite number"),  # type: ignore[arg-type]
    ],
)
def test_bad_hyperparameters_are_refused_with_the_rule(make, message: str) -> None:
    from lightning_fed.errors import SettingError

    with pytest.raises(SettingError, match=message):
        make()
