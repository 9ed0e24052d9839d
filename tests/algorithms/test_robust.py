"""Robust statistics against references written from the papers, on hand-made updates."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from lightning_fed.algorithms import ClientUpdate, Krum, Median, ModelSpec, TensorSpec, TrimmedMean
from lightning_fed.algorithms import spool as spool_module
from lightning_fed.algorithms.krum import krum_scores, krum_select, squared_distances
from lightning_fed.algorithms.median import coordinate_median
from lightning_fed.algorithms.trimmed_mean import trimmed_mean
from lightning_fed.errors import SettingError


def columns(values: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in values[:, j]] for j in range(values.shape[1])]


@pytest.mark.parametrize("clients", [1, 2, 5, 6])
def test_median_per_coordinate_with_ties_and_even_counts(clients: int) -> None:
    g = torch.Generator().manual_seed(clients)
    values = torch.randint(-3, 4, (clients, 40), generator=g).double()  # many ties
    want = torch.tensor([statistics.median(col) for col in columns(values)], dtype=torch.float64)
    assert torch.equal(coordinate_median(values), want)


@pytest.mark.parametrize(("clients", "beta"), [(5, 0.2), (6, 0.2), (10, 0.25), (4, 0.0), (3, 0.49)])
def test_trimmed_mean_drops_floor_beta_n_from_each_end(clients: int, beta: float) -> None:
    g = torch.Generator().manual_seed(clients)
    values = torch.randn(clients, 30, generator=g, dtype=torch.float64)
    cut = int(beta * clients)
    want = torch.tensor(
        [statistics.fmean(sorted(col)[cut : clients - cut]) for col in columns(values)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(trimmed_mean(values, beta), want)


def test_krum_scores_and_selection_follow_blanchard_et_al() -> None:
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(6, 10, generator=g, dtype=torch.float64) * 0.1
    outlier = torch.full((1, 10), 5.0, dtype=torch.float64)
    values = torch.cat([honest[:3], outlier, honest[3:]])
    d = squared_distances(values)
    n, f = 7, 2
    for i in range(n):  # the definition: sum over the n - f - 2 closest others
        others = sorted(float(((values[i] - values[j]) ** 2).sum()) for j in range(n) if j != i)
        assert float(krum_scores(d, f)[i]) == pytest.approx(sum(others[: n - f - 2]), rel=1e-9)
    chosen = krum_select(d, f, 1)
    assert chosen != [3] and len(chosen) == 1
    assert 3 not in krum_select(d, f, 5)  # multi-Krum keeps honest ones


def test_krum_ties_go_to_the_lower_index_and_too_few_updates_are_refused() -> None:
    same = torch.zeros(5, 4, dtype=torch.float64)
    assert krum_select(squared_distances(same), 1, 2) == [0, 1]
    from lightning_fed.algorithms import AlgorithmError

    with pytest.raises(AlgorithmError, match="needs at least 5 updates, got 4"):
        krum_scores(squared_distances(same[:4]), 2)
    with pytest.raises(SettingError, match="needs at least 5 clients"):
        Krum(byzantine=1).setup(ModelSpec({}, frozenset()), clients=4)


@pytest.mark.parametrize(
    "fn",
    [coordinate_median, lambda v: trimmed_mean(v, 0.1), squared_distances],
    ids=["median", "trimmed", "krum"],
)
def test_non_finite_values_are_refused(fn) -> None:
    values = torch.zeros(3, 4, dtype=torch.float64)
    values[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(values)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(7, 5, generator=g),
        "h": torch.randn(3, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(seed * 3, dtype=torch.int64),
    }


def _fold(algorithm, states: list[dict[str, torch.Tensor]], samples: list[int]):
    stat = algorithm.statistic()
    for i, (s, n) in enumerate(zip(states, samples, strict=True)):
        stat.add(ClientUpdate(f"c{i}", s, n))
    return stat


@pytest.mark.parametrize("chunk", [1, 4, 1 << 19])
def test_spooled_statistics_equal_the_in_memory_maths_at_any_chunk_size(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "CHUNK", chunk)
    states = [_state(s) for s in range(6)]
    samples = [5, 1, 9, 2, 7, 3]

    def stacked(name: str) -> torch.Tensor:
        return torch.stack([s[name].double().reshape(-1) for s in states])

    median = _fold(Median(), states, samples).result()
    trimmed = _fold(TrimmedMean(beta=0.2), states, samples).result()
    krum = _fold(Krum(byzantine=1, select=2), states, samples).result()
    assert median.clients == 6 and median.samples == sum(samples)
    distances = sum(squared_distances(stacked(k)) for k in states[0])
    keep = krum_select(distances, 1, 2)
    w = torch.tensor([samples[i] for i in keep], dtype=torch.float64)
    for name, like in states[0].items():
        for got, want in (
            (median.mean[name], coordinate_median(stacked(name))),
            (trimmed.mean[name], trimmed_mean(stacked(name), 0.2)),
            (krum.mean[name], (w / w.sum()) @ stacked(name)[keep]),
        ):
            assert got.dtype == like.dtype and got.shape == like.shape
            if like.is_floating_point():
                torch.testing.assert_close(got.double().reshape(-1), want.to(like.dtype).double())
            else:
                assert torch.equal(got.reshape(-1), want.round().long())


def test_spooled_statistics_merge_and_leave_no_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # honour the new TMPDIR
    states = [_state(s) for s in range(5)]
    whole = _fold(Median(), states, [1] * 5)
    left, right = _fold(Median(), states[:2], [1] * 2), _fold(Median(), states[2:], [1] * 3)
    assert len(list(tmp_path.iterdir())) == 3  # one folder per statistic
    left.merge(right)
    a, b = whole.result(), left.result()
    assert all(torch.equal(a.mean[k], b.mean[k]) for k in a.mean)
    del right
    assert list(tmp_path.iterdir()) == []  # results and merges clean up after themselves


def test_trimmed_mean_and_krum_refuse_bad_settings() -> None:
    for make in (lambda: TrimmedMean(beta=0.5), lambda: Krum(byzantine=-1), lambda: Krum(select=0)):
        with pytest.raises(SettingError):
            make()
    assert TensorSpec  # re-exported for algorithm authors
