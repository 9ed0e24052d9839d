"""Seeded IID and Dirichlet (label-skewed) splits of a dataset across simulated clients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_fed.fedavg.partition import dirichlet_partition, iid_partition

N_CLASSES = 10


def labels_of(size=1000, seed=0):
    return np.random.default_rng(seed).integers(0, N_CLASSES, size=size)


def assert_disjoint_cover(parts, size):
    flat = [i for p in parts for i in p]
    assert len(flat) == size, "parts overlap or miss samples"
    assert sorted(flat) == list(range(size))
    for p in parts:
        assert p == sorted(p)
        assert all(isinstance(i, int) for i in p)


def mean_max_class_share(parts, labels):
    labels = np.asarray(labels)
    shares = [np.bincount(labels[p], minlength=N_CLASSES).max() / len(p) for p in parts if p]
    return float(np.mean(shares))


# -- IID -------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "clients"), [(10, 1), (10, 3), (100, 7), (5, 5), (1001, 10)])
def test_iid_disjoint_cover_and_near_equal(size, clients):
    parts = iid_partition(size, clients, seed=1)
    assert len(parts) == clients
    assert_disjoint_cover(parts, size)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_seeded():
    assert iid_partition(100, 4, seed=3) == iid_partition(100, 4, seed=3)
    assert iid_partition(100, 4, seed=3) != iid_partition(100, 4, seed=4)
    assert iid_partition(100, 4) == iid_partition(100, 4, seed=0)


def test_iid_is_shuffled():
    parts = iid_partition(100, 4, seed=0)
    assert parts[0] != list(range(25))
    assert parts[0] != list(range(0, 100, 4))


# -- Dirichlet -------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 1000.0])
def test_dirichlet_disjoint_cover(alpha):
    labels = labels_of()
    parts = dirichlet_partition(labels, 5, alpha=alpha, seed=2)
    assert len(parts) == 5
    assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize(
    "convert", [list, np.asarray, torch.as_tensor, lambda y: torch.as_tensor(y).view(-1, 1)]
)
def test_dirichlet_accepts_list_array_tensor(convert):
    labels = labels_of(200)
    want = dirichlet_partition(labels.tolist(), 3, alpha=0.5, seed=0)
    assert dirichlet_partition(convert(labels), 3, alpha=0.5, seed=0) == want


def test_dirichlet_seeded():
    labels = labels_of()
    a = dirichlet_partition(labels, 4, alpha=0.5, seed=7)
    assert a == dirichlet_partition(labels, 4, alpha=0.5, seed=7)
    assert a != dirichlet_partition(labels, 4, alpha=0.5, seed=8)


def test_small_alpha_is_more_label_skewed_than_large_alpha():
    labels = labels_of(2000)
    skewed = mean_max_class_share(dirichlet_partition(labels, 10, alpha=0.1, seed=0), labels)
    iid_like = mean_max_class_share(dirichlet_partition(labels, 10, alpha=1000, seed=0), labels)
    # Near-IID: each client's top class is ~1/10 of its data; alpha=0.1: a few dominate.
    assert iid_like < 0.2
    assert skewed > 0.4
    assert skewed > 2 * iid_like


def test_large_alpha_gives_near_equal_sizes():
    labels = labels_of(2000)
    sizes = [len(p) for p in dirichlet_partition(labels, 4, alpha=1000, seed=0)]
    assert max(sizes) - min(sizes) < 0.1 * 500


def test_min_size_respected():
    labels = labels_of(300)
    parts = dirichlet_partition(labels, 10, alpha=0.1, seed=0, min_size=10)
    assert min(len(p) for p in parts) >= 10
    assert_disjoint_cover(parts, 300)


def test_impossible_min_size_raises_up_front():
    with pytest.raises(ValueError, match=r"min_size=11 x 10 clients exceeds the 100 samples"):
        dirichlet_partition(labels_of(100), 10, alpha=1.0, min_size=11)


def test_unreachable_min_size_raises_after_max_tries():
    # Every client needs exactly 10 of 100 samples: no skewed draw can manage it.
    with pytest.raises(ValueError, match=r"no Dirichlet\(alpha=0.1\) draw in 5 tries") as info:
        dirichlet_partition(labels_of(100), 10, alpha=0.1, min_size=10, max_tries=5)
    assert "min_size" in str(info.value)


# -- bad arguments ---------------------------------------------------------------


@pytest.mark.parametrize("clients", [0, -1, True, False, 2.0, "3", None])
def test_bad_clients_raise(clients):
    with pytest.raises(ValueError, match=r"clients must be an int >= 1"):
        iid_partition(10, clients)
    with pytest.raises(ValueError, match=r"clients must be an int >= 1"):
        dirichlet_partition(labels_of(10), clients, alpha=1.0)


def test_more_clients_than_samples_raise():
    with pytest.raises(ValueError, match=r"cannot split 3 samples across 4 clients"):
        iid_partition(3, 4)
    with pytest.raises(ValueError, match=r"cannot split 3 samples across 4 clients"):
        dirichlet_partition([0, 1, 2], 4, alpha=1.0)
    with pytest.raises(ValueError, match=r"cannot split 0 samples"):
        dirichlet_partition([], 1, alpha=1.0)


@pytest.mark.parametrize("alpha", [0, 0.0, -1, -0.5, float("nan"), "1", None])
def test_bad_alpha_raise(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a number > 0"):
        dirichlet_partition(labels_of(50), 2, alpha=alpha)
