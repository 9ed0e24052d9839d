"""The same split, the same batch order and the batch digests on every party."""

from __future__ import annotations

import random

import pytest

from lightning_fed.hetero.order import batch_digest, batches, canonical, epoch_order, split_ids

IDS = [f"id-{i}" for i in range(1000)]


def shuffled(ids, seed):
    out = list(ids)
    random.Random(seed).shuffle(out)
    return out


def test_every_party_gets_the_same_lists_whatever_order_it_holds_the_ids_in():
    a, b = shuffled(IDS, 1), shuffled(IDS, 2)
    assert canonical(a) == canonical(b)
    assert split_ids(a, 0.2, seed=5) == split_ids(b, 0.2, seed=5)
    assert epoch_order(a, 3, seed=5) == epoch_order(b, 3, seed=5)


def test_split_sizes_disjointness_and_seed():
    train, test = split_ids(IDS, 0.2, seed=0)
    assert len(test) == 200 and len(train) == 800
    assert not set(train) & set(test) and set(train) | set(test) == set(IDS)
    assert train == canonical(train) and test == canonical(test)
    assert split_ids(IDS, 0.2, seed=1)[1] != test
    assert split_ids(IDS, 0.0) == (canonical(IDS), [])
    assert len(split_ids(IDS[:7], 0.1)[1]) == 1  # rounded up: at least one test ID
    for bad in (1.0, -0.1, "0.2", None):
        with pytest.raises(ValueError, match="test_fraction must be in"):
            split_ids(IDS, bad)


def test_epoch_orders_differ_between_epochs_and_keep_every_id():
    e0, e1 = epoch_order(IDS, 0), epoch_order(IDS, 1)
    assert sorted(e0) == sorted(e1) == sorted(IDS)
    assert e0 != e1 and e0 != canonical(IDS)
    assert epoch_order(IDS, 1, seed=9) != e1


def test_batches_and_digests():
    bs = batches(epoch_order(IDS, 0), 128)
    assert [len(b) for b in bs] == [128] * 7 + [104]
    assert len({batch_digest(b) for b in bs}) == 8
    assert batch_digest(["a", "b"]) != batch_digest(["b", "a"])  # order matters
    assert batch_digest([7, 8]) == batch_digest(["7", "8"])  # by encoding
    assert batch_digest(["ab", "c"]) != batch_digest(["a", "bc"])  # boundaries count
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        batches(IDS, 0)
