"""FedAvg's weighted mean (streaming sufficient statistics) and the update checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_fed.algorithms.aggregate import (
    FINITE_CHUNK,
    TensorSpec,
    WeightedMean,
    all_finite,
    spec_of,
    update_problems,
    weighted_average,
)

SHAPES = {"layer.weight": (4, 3), "layer.bias": (4,), "head.weight": (2, 4)}


def make_state(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g, dtype=dtype) for name, shape in SHAPES.items()}


def explicit_mean(updates):
    """sum(n_k * w_k) / sum(n_k), written out in float64."""
    total = sum(n for _, n in updates)
    return {
        name: sum(state[name].double() * n for state, n in updates) / total
        for name in updates[0][0]
    }


def assert_states_close(got, want, **tol):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], check_dtype=False, **tol)


# -- weighted_average: the formula ---------------------------------------------------


def test_weighted_average_matches_explicit_formula():
    updates = [(make_state(seed), n) for seed, n in enumerate([7, 120, 33, 1, 58])]
    got = weighted_average(updates)
    want = explicit_mean(updates)
    for name in SHAPES:
        assert got[name].dtype == torch.float32
        assert got[name].shape == SHAPES[name]
        torch.testing.assert_close(got[name], want[name].float(), rtol=1e-5, atol=1e-6)


def test_float_weights_are_accepted():
    updates = [(make_state(0), 2.5), (make_state(1), 0.5)]
    assert_states_close(weighted_average(updates), explicit_mean(updates), rtol=1e-5, atol=1e-6)


def test_float64_stays_float64_and_exact():
    updates = [(make_state(seed, torch.float64), n) for seed, n in enumerate([3, 10, 4])]
    got = weighted_average(updates)
    want = explicit_mean(updates)
    for name in SHAPES:
        assert got[name].dtype == torch.float64
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_floats_keep_their_dtype(dtype):
    updates = [(make_state(seed, dtype), n) for seed, n in enumerate([3, 5])]
    got = weighted_average(updates)
    for name in SHAPES:
        assert got[name].dtype == dtype
    assert_states_close(got, explicit_mean(updates), rtol=1e-2, atol=1e-2)


def test_int64_buffers_are_averaged_rounded_and_keep_dtype():
    # Like BatchNorm's num_batches_tracked: (10*1 + 20*3) / 4 = 17.5 -> 18 (half to even).
    updates = [
        ({"bn.num_batches_tracked": torch.tensor(10)}, 1),
        ({"bn.num_batches_tracked": torch.tensor(20)}, 3),
    ]
    got = weighted_average(updates)["bn.num_batches_tracked"]
    assert got.dtype == torch.int64
    assert got.shape == ()
    assert got.item() == 18

    vec = [
        ({"counts": torch.tensor([1, 2, 100], dtype=torch.int64)}, 2),
        ({"counts": torch.tensor([4, 2, 0], dtype=torch.int64)}, 1),
    ]
    got = weighted_average(vec)["counts"]
    assert got.dtype == torch.int64
    # (2*1+4)/3 = 2, (2*2+2)/3 = 2, (200+0)/3 = 66.67 -> 67
    assert got.tolist() == [2, 2, 67]


def test_mixed_state_float_and_int():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(8)}
    got = weighted_average([(a, 1), (b, 1)])
    torch.testing.assert_close(got["w"], torch.tensor([2.0, 4.0]))
    assert got["n"].dtype == torch.int64 and got["n"].item() == 6


def test_order_independence():
    updates = [(make_state(seed), n) for seed, n in enumerate([5, 17, 2, 40])]
    reference = weighted_average(updates)
    for perm in itertools.permutations(updates):
        assert_states_close(weighted_average(list(perm)), reference, rtol=1e-5, atol=1e-6)


def test_equal_weights_give_plain_mean():
    states = [make_state(seed) for seed in range(4)]
    got = weighted_average((s, 9) for s in states)
    for name in SHAPES:
        want = torch.stack([s[name] for s in states]).mean(dim=0)
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 13, 0.25, 1e9])
def test_single_update_gives_itself_back(n):
    state = make_state(3)
    got = weighted_average([(state, n)])
    for name in SHAPES:
        torch.testing.assert_close(got[name], state[name], rtol=1e-6, atol=1e-6)


def test_weighted_average_accepts_a_generator():
    updates = [(make_state(seed), n) for seed, n in enumerate([1, 2, 3])]
    got = weighted_average(u for u in updates)
    assert_states_close(got, explicit_mean(updates), rtol=1e-5, atol=1e-6)


# -- WeightedMean: streaming -----------------------------------------------------------


def test_add_keeps_no_reference_to_inputs():
    a, b = make_state(0), make_state(1)
    originals = [{k: v.clone() for k, v in s.items()} for s in (a, b)]
    mean = WeightedMean()
    mean.add(a, 3)
    mean.add(b, 5)
    for state in (a, b):  # the caller reuses its buffers after add()
        for t in state.values():
            t.fill_(1e6)
    got = mean.compute()
    assert_states_close(
        got, explicit_mean([(originals[0], 3), (originals[1], 5)]), rtol=1e-5, atol=1e-6
    )


def test_add_does_not_modify_inputs():
    a, b = make_state(0), make_state(1)
    before = [{k: v.clone() for k, v in s.items()} for s in (a, b)]
    mean = WeightedMean()
    mean.add(a, 3)
    mean.add(b, 5)
    mean.compute()
    for state, copy in zip((a, b), before):
        for name in SHAPES:
            assert torch.equal(state[name], copy[name])


def test_add_detaches_tensors_that_require_grad():
    w = torch.ones(3, requires_grad=True)
    mean = WeightedMean()
    mean.add({"w": w}, 1)
    mean.add({"w": w * 3}, 1)
    got = mean.compute()["w"]
    assert not got.requires_grad
    torch.testing.assert_close(got, torch.full((3,), 2.0))


def test_streaming_equals_batch_and_counts():
    updates = [(make_state(seed), n) for seed, n in enumerate([4, 9, 1])]
    mean = WeightedMean()
    for state, n in updates:
        mean.add(state, n)
    assert mean.count == 3
    assert mean.total_weight == pytest.approx(14.0)
    assert_states_close(mean.compute(), weighted_average(updates), rtol=0, atol=0)


def test_compute_resets_so_the_mean_can_be_reused():
    mean = WeightedMean()
    mean.add({"w": torch.tensor([1.0])}, 1)
    mean.compute()
    assert mean.count == 0 and mean.total_weight == 0.0
    with pytest.raises(ValueError, match="no update"):
        mean.compute()
    mean.add({"w": torch.tensor([5.0])}, 2)
    torch.testing.assert_close(mean.compute()["w"], torch.tensor([5.0]))


def test_compute_with_nothing_added_raises():
    with pytest.raises(ValueError, match="no update was added"):
        WeightedMean().compute()
    with pytest.raises(ValueError, match="no update was added"):
        weighted_average([])


@pytest.mark.parametrize(
    "bad", [0, -1, 0.0, -2.5, math.nan, math.inf, -math.inf, True, False, "3", None, [3]]
)
def test_bad_num_samples_raise(bad):
    mean = WeightedMean()
    with pytest.raises(ValueError, match="num_samples"):
        mean.add({"w": torch.ones(2)}, bad)
    # A rejected update leaves the mean untouched.
    assert mean.count == 0 and mean.total_weight == 0.0
    with pytest.raises(ValueError, match="num_samples"):
        weighted_average([({"w": torch.ones(2)}, bad)])


def test_mismatched_names_raise():
    mean = WeightedMean()
    mean.add({"a": torch.ones(2), "b": torch.ones(2)}, 1)
    with pytest.raises(ValueError, match="same tensor names") as info:
        mean.add({"a": torch.ones(2), "c": torch.ones(2)}, 1)
    assert "'b'" in str(info.value) and "'c'" in str(info.value)
    with pytest.raises(ValueError, match="same tensor names"):
        mean.add({"a": torch.ones(2)}, 1)
    with pytest.raises(ValueError, match="same tensor names"):
        mean.add({"a": torch.ones(2), "b": torch.ones(2), "extra": torch.ones(1)}, 1)
    # The rejected updates changed nothing.
    assert mean.count == 1
    torch.testing.assert_close(mean.compute()["a"], torch.ones(2))


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match=r"w: shape \(3,\) differs from the first update's \(2,\)"):
        weighted_average([({"w": torch.ones(2)}, 1), ({"w": torch.ones(3)}, 1)])
    with pytest.raises(ValueError, match="shape"):
        weighted_average([({"w": torch.ones(2, 3)}, 1), ({"w": torch.ones(3, 2)}, 1)])


def test_shape_error_leaves_the_mean_untouched():
    mean = WeightedMean()
    mean.add({"a": torch.tensor([1.0]), "b": torch.tensor([1.0])}, 1)
    with pytest.raises(ValueError, match="shape"):
        mean.add({"a": torch.tensor([100.0]), "b": torch.ones(2)}, 1)
    assert mean.count == 1
    torch.testing.assert_close(mean.compute()["a"], torch.tensor([1.0]))


def test_huge_int_num_samples_is_a_value_error():
    with pytest.raises(ValueError, match="num_samples"):
        WeightedMean().add({"w": torch.ones(1)}, 10**400)


# -- spec_of / update_problems ------------------------------------------------------------


def reference_state():
    return {
        "conv.weight": torch.zeros(2, 3),
        "conv.bias": torch.zeros(2),
        "bn.num_batches_tracked": torch.tensor(0),
    }


def test_spec_of():
    spec = spec_of(reference_state())
    assert spec == {
        "conv.weight": TensorSpec((2, 3), torch.float32),
        "conv.bias": TensorSpec((2,), torch.float32),
        "bn.num_batches_tracked": TensorSpec((), torch.int64),
    }
    assert TensorSpec.of(torch.zeros(4, 1, dtype=torch.float64)) == TensorSpec(
        (4, 1), torch.float64
    )
    assert all(isinstance(s.shape, tuple) for s in spec.values())


def test_update_problems_empty_for_matching_state():
    expected = spec_of(reference_state())
    state = {k: torch.randn(v.shape).to(v.dtype) for k, v in expected.items()}
    assert update_problems(expected, state) == []


def test_update_problems_empty_for_empty_model():
    assert update_problems({}, {}) == []


def _missing(s):
    del s["conv.bias"]


def _unexpected(s):
    s["conv.extra"] = torch.zeros(1)


def _shape(s):
    s["conv.bias"] = torch.zeros(3)


def _dtype(s):
    s["conv.bias"] = torch.zeros(2, dtype=torch.float64)


def _int_dtype(s):
    s["bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.int32)


def _nan(s):
    s["conv.bias"] = torch.tensor([0.0, math.nan])


def _posinf(s):
    s["conv.bias"] = torch.tensor([math.inf, 0.0])


def _neginf(s):
    s["conv.bias"] = torch.tensor([0.0, -math.inf])


@pytest.mark.parametrize(
    ("mutate", "name", "words"),
    [
        (_missing, "conv.bias", "missing"),
        (_unexpected, "conv.extra", "unexpected"),
        (_shape, "conv.bias", "shape (3,), expected (2,)"),
        (_dtype, "conv.bias", "dtype torch.float64, expected torch.float32"),
        (_int_dtype, "bn.num_batches_tracked", "dtype torch.int32, expected torch.int64"),
        (_nan, "conv.bias", "NaN"),
        (_posinf, "conv.bias", "Inf"),
        (_neginf, "conv.bias", "Inf"),
    ],
    ids=["missing", "unexpected", "shape", "dtype", "int-dtype", "nan", "+inf", "-inf"],
)
def test_update_problems_reports_each_defect(mutate, name, words):
    expected = spec_of(reference_state())
    state = reference_state()
    mutate(state)
    problems = update_problems(expected, state)
    assert len(problems) == 1, problems
    assert name in problems[0]
    assert words in problems[0]


def test_update_problems_reports_several_defects_at_once():
    expected = spec_of(reference_state())
    state = reference_state()
    _missing(state)
    _unexpected(state)
    state["conv.weight"] = torch.full((2, 3), math.nan)
    problems = update_problems(expected, state)
    assert len(problems) == 3
    text = "; ".join(problems)
    for name in ("conv.bias", "conv.extra", "conv.weight"):
        assert name in text


def test_update_problems_shortens_long_name_lists():
    expected = {f"t{i}": TensorSpec((1,), torch.float32) for i in range(8)}
    (problem,) = update_problems(expected, {})
    assert problem.startswith("missing tensors 't0', 't1', 't2', 't3', 't4'")
    assert problem.endswith("and 3 more")


def test_update_problems_does_not_flag_large_finite_values():
    expected = spec_of({"w": torch.zeros(2)})
    big = torch.tensor([torch.finfo(torch.float32).max, -1e30])
    assert update_problems(expected, {"w": big}) == []


# -- all_finite: the fast sum and the exact chunked pass --------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_all_finite_finds_one_bad_value_anywhere(dtype, bad):
    size = 2 * FINITE_CHUNK + 17  # several chunks of the exact pass, and a ragged end
    for where in (0, FINITE_CHUNK - 1, FINITE_CHUNK, size - 1):
        t = torch.zeros(size, dtype=dtype)
        assert all_finite(t)
        t[where] = bad
        assert not all_finite(t), (dtype, bad, where)


def test_all_finite_is_exact_when_the_fast_sum_overflows():
    huge = torch.finfo(torch.float32).max
    t = torch.full((FINITE_CHUNK + 5,), huge)  # the float32 sum is inf, every value finite
    assert not bool(torch.isfinite(t.sum()))
    assert all_finite(t)
    t[-1] = math.inf
    assert not all_finite(t)


def test_all_finite_sees_opposite_infinities_that_cancel_in_a_sum():
    assert not all_finite(torch.tensor([math.inf, -math.inf, 1.0]))


def test_all_finite_on_views_complex_integers_and_empty_tensors():
    t = torch.ones(64, 32)
    t[3, 5] = math.nan
    assert not all_finite(t.t())  # a non-contiguous view
    assert not all_finite(t[3])
    assert all_finite(t[4])
    assert not all_finite(torch.tensor([1 + 1j, complex(math.nan, 0)]))
    assert all_finite(torch.tensor([1 + 1j, 2 - 3j]))
    assert all_finite(torch.tensor([2**62, -(2**62)], dtype=torch.int64))
    assert all_finite(torch.tensor([True, False]))
    assert all_finite(torch.empty(0))


def test_all_finite_agrees_with_isfinite_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        t = torch.randn(int(torch.randint(1, 5000, (1,), generator=g)), generator=g) * 1e37
        if trial % 2:
            idx = torch.randint(0, t.numel(), (3,), generator=g)
            t[idx] = torch.tensor([math.nan, math.inf, -math.inf])[trial % 3]
        assert all_finite(t) == bool(torch.isfinite(t).all())
