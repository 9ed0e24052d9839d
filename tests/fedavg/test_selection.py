"""Which tensors are federated (local_keys globs) and which clients each round samples."""

from __future__ import annotations

import math

import pytest
from torch import nn

from lightning_fed.fedavg.selection import (
    BATCHNORM_STATS,
    federated_names,
    participants_per_round,
    sample_clients,
    select,
)

CLIENTS = [f"client-{i:02d}" for i in range(10)]


# -- federated_names / select ----------------------------------------------------


def test_batchnorm_stats_keep_exactly_the_running_stats_local():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    names = list(model.state_dict())
    assert names == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
        "3.weight",
        "3.bias",
    ]
    federated = federated_names(names, BATCHNORM_STATS)
    assert federated == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert set(names) - set(federated) == {
        name for name, _ in model.named_buffers()
    }  # exactly BatchNorm's buffers, its affine weight and bias are still averaged


def test_no_local_keys_federates_everything_in_order():
    names = ["b", "a", "c.running_mean"]
    assert federated_names(names, ()) == names
    assert federated_names(iter(names), []) == names


def test_local_keys_are_case_sensitive_globs():
    names = ["enc.weight", "enc.bias", "dec.weight", "Enc.weight", "head.0.weight"]
    assert federated_names(names, ["enc.*"]) == ["dec.weight", "Enc.weight", "head.0.weight"]
    assert federated_names(names, ["*.weight"]) == ["enc.bias"]
    assert federated_names(names, ["head.?.weight", "dec.*"]) == [
        "enc.weight",
        "enc.bias",
        "Enc.weight",
    ]
    assert federated_names(names, ["*"]) == []


def test_select_keeps_state_order():
    state = {"c": 3, "a": 1, "b": 2}
    assert list(select(state, {"b", "c"})) == ["c", "b"]
    assert select(state, ["a", "missing"]) == {"a": 1}
    assert select(state, ()) == {}


# -- participants_per_round --------------------------------------------------------


@pytest.mark.parametrize(
    ("per_round", "available", "want"),
    [
        (None, 7, 7),
        (None, 0, 0),
        (1, 7, 1),
        (3, 7, 3),
        (7, 7, 7),
        (100, 7, 7),  # an int count is capped at the clients available
        (1.0, 7, 7),
        (0.5, 7, 4),  # 3.5 rounds up
        (0.5, 8, 4),
        (0.1, 7, 1),  # 0.7 rounds up, never 0
        (0.01, 3, 1),
        (1e-9, 1000, 1),
        (0.3, 10, 3),
        (0.25, 10, 3),
    ],
)
def test_participants_per_round(per_round, available, want):
    assert participants_per_round(per_round, available) == want


def test_fraction_never_gives_zero():
    for available in range(1, 50):
        for fraction in (1e-6, 0.01, 0.1, 0.33, 0.5, 0.99, 1.0):
            k = participants_per_round(fraction, available)
            assert 1 <= k <= available


@pytest.mark.parametrize(("fraction", "available", "want"), [(0.07, 100, 7), (0.14, 50, 7)])
def test_exact_fraction_is_not_rounded_up_by_float_noise(fraction, available, want):
    assert participants_per_round(fraction, available) == want


@pytest.mark.parametrize(
    "bad", [0, -1, 0.0, -0.5, 1.5, 2.0, math.nan, math.inf, True, False, "3", [2]]
)
def test_bad_per_round_raise(bad):
    with pytest.raises(ValueError, match="clients_per_round"):
        participants_per_round(bad, 5)
    with pytest.raises(ValueError, match="clients_per_round"):
        sample_clients(CLIENTS, bad, seed=0, round=0)


# -- sample_clients ------------------------------------------------------------------


def test_sampling_is_reproducible_for_seed_and_round():
    for round in range(5):
        first = sample_clients(CLIENTS, 3, seed=11, round=round)
        assert sample_clients(list(reversed(CLIENTS)), 3, seed=11, round=round) == first
        assert sample_clients(set(CLIENTS), 3, seed=11, round=round) == first


def test_sampling_varies_across_rounds_and_seeds():
    by_round = {tuple(sample_clients(CLIENTS, 3, seed=0, round=r)) for r in range(20)}
    assert len(by_round) > 5
    by_seed = {tuple(sample_clients(CLIENTS, 3, seed=s, round=0)) for s in range(20)}
    assert len(by_seed) > 5


def test_sampling_covers_every_client_over_many_rounds():
    seen = set()
    for r in range(50):
        seen.update(sample_clients(CLIENTS, 2, seed=0, round=r))
    assert seen == set(CLIENTS)


@pytest.mark.parametrize(
    ("per_round", "size"), [(1, 1), (3, 3), (0.5, 5), (0.25, 3), (0.01, 1), (9, 9)]
)
def test_sample_is_sorted_unique_subset_of_right_size(per_round, size):
    for r in range(10):
        chosen = sample_clients(CLIENTS, per_round, seed=4, round=r)
        assert len(chosen) == size
        assert chosen == sorted(chosen)
        assert len(set(chosen)) == size
        assert set(chosen) <= set(CLIENTS)


@pytest.mark.parametrize("per_round", [None, 10, 25, 1.0])
def test_all_clients_when_per_round_covers_them(per_round):
    assert sample_clients(reversed(CLIENTS), per_round, seed=0, round=3) == CLIENTS


def test_no_clients_gives_empty_round():
    assert sample_clients([], None, seed=0, round=0) == []
    assert sample_clients([], 3, seed=0, round=0) == []
