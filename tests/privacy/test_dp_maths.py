"""Differential privacy's maths: clipping, the noise's distribution, adaptive clipping,
and the accountant against the library and a closed form."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from lightning_fed.algorithms import ClientUpdate, FedAvg, ModelSpec, TensorSpec
from lightning_fed.errors import SettingError
from lightning_fed.fedavg.dp_aggregator import ClippedMean, PrivateRounds
from lightning_fed.privacy import (
    Accountant,
    AdaptiveClipping,
    DifferentialPrivacy,
    LocalDP,
    SecureAggregation,
    noise_multiplier_for,
)
from lightning_fed.privacy.dp import (
    add_noise_,
    clip_,
    l2_norm,
    next_clip,
    noise_generator,
    update_noise_multiplier,
)

D = 1_000_000  # coordinates: the sample std is within 0.3% of the true one (4 sigma)


def test_clipping_bounds_the_norm_and_keeps_small_updates() -> None:
    big = {"a": torch.full((3, 4), 2.0), "b": torch.full((5,), -3.0)}
    before = l2_norm(big)
    assert before == pytest.approx(math.sqrt(12 * 4 + 5 * 9))
    assert clip_(big, 1.5) == pytest.approx(before)
    assert l2_norm(big) == pytest.approx(1.5)
    assert big["a"][0, 0] / big["b"][0] == pytest.approx(2.0 / -3.0)  # direction kept
    small = {"a": torch.tensor([0.3, 0.4])}
    clip_(small, 1.0)
    assert torch.equal(small["a"], torch.tensor([0.3, 0.4]))


@pytest.mark.parametrize("std", [0.05, 1.0, 3.0])
def test_the_noise_has_the_configured_standard_deviation(std: float) -> None:
    """One million draws with a fixed seed: the sample std is within 1% of ``std`` (the
    standard error is 0.07%, so a wrong std, even by 2%, cannot pass) and the mean is 0."""
    t = {"w": torch.zeros(D)}
    add_noise_(t, std, noise_generator(1234))
    x = t["w"].double()
    assert float(x.std()) == pytest.approx(std, rel=0.01)
    assert abs(float(x.mean())) < 5 * std / math.sqrt(D)
    # Gaussian, not merely the right spread: the fourth standardized moment is 3.
    kurtosis = float(((x - x.mean()) ** 4).mean() / x.var() ** 2)
    assert kurtosis == pytest.approx(3.0, abs=0.05)


def test_the_noise_differs_between_generators_and_is_reproducible_with_a_seed() -> None:
    a, b, c = ({"w": torch.zeros(1000)} for _ in range(3))
    add_noise_(a, 1.0, noise_generator(7))
    add_noise_(b, 1.0, noise_generator(7))
    add_noise_(c, 1.0, noise_generator())
    assert torch.equal(a["w"], b["w"])
    assert not torch.equal(a["w"], c["w"])


def test_central_dp_mean_is_the_clipped_equal_weight_mean_plus_noise_of_sigma_c_over_m() -> None:
    """Five clients, one sending a huge update: the mean of the clipped changes, with
    noise of std noise_multiplier * clip / clients on every coordinate."""
    glob = {"w": torch.ones(D)}
    clip, z, m = 2.0, 1.5, 5
    stat = ClippedMean(glob, clip, z * clip, 0.0, noise_generator(99))
    for i in range(m):
        change = torch.zeros(D)
        change[i] = 1000.0 if i == 0 else 0.5  # client 0 is clipped to 2.0
        stat.add(ClientUpdate(f"c{i}", {"w": glob["w"] + change}, num_samples=10 * (i + 1)))
    agg = stat.result()
    assert agg.clients == m and stat.unclipped == m - 1
    noise = agg.mean["w"].double() - 1.0
    noise[:m] -= torch.tensor([2.0, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64) / m
    assert float(noise.std()) == pytest.approx(z * clip / m, rel=0.01)
    assert abs(float(noise.mean())) < 5 * z * clip / m / math.sqrt(D)


def test_distributed_noise_shares_sum_to_the_central_noise() -> None:
    """Each of m clients adds std sigma*C/sqrt(m): their sum has std sigma*C."""
    rounds = PrivateRounds(DifferentialPrivacy(noise_multiplier=1.2, clip=0.5), None, 10)
    share = rounds.round_noise(8)
    assert share.clip == 0.5 and share.std == pytest.approx(1.2 * 0.5 / math.sqrt(8))
    total = torch.zeros(D)
    g = noise_generator(5)
    for _ in range(8):
        t = {"w": torch.zeros(D)}
        add_noise_(t, share.std, g)
        total += t["w"]
    assert float(total.std()) == pytest.approx(1.2 * 0.5, rel=0.01)


def test_adaptive_clipping_moves_towards_the_quantile_and_splits_the_noise() -> None:
    assert next_clip(1.0, 0.5, 0.5, 0.2) == 1.0
    assert next_clip(1.0, 1.0, 0.5, 0.2) == pytest.approx(math.exp(-0.1))  # all fit: shrink
    assert next_clip(1.0, 0.0, 0.5, 0.2) == pytest.approx(math.exp(0.1))
    z = update_noise_multiplier(1.0, 0.5 * 10 / 2)  # count std m/20 with m=50
    assert z > 1.0 and (z**-2 + (2 * 2.5) ** -2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must exceed half"):
        update_noise_multiplier(4.0, 1.0)
    # 50 updates of norms 1..50: the clip climbs from 0.1 to near their median.
    stat_clip = 0.1
    norms = np.arange(1, 51, dtype=float)
    for _ in range(200):
        fraction = float((norms <= stat_clip).mean())
        stat_clip = next_clip(stat_clip, fraction, 0.5, 0.2)
    assert 20 <= stat_clip <= 31


def _closed_form_gaussian_epsilon(z: float, steps: int, delta: float) -> float:
    """T Gaussian mechanisms without sampling: RDP of order a is T*a/(2 z^2); converted to
    (epsilon, delta) with Balle et al.'s bound (the one Opacus uses), minimised over a."""
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = steps * orders / (2 * z**2)
    eps = rdp + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(np.nanmin(eps))


def test_the_accountant_equals_the_library_and_the_closed_form() -> None:
    ours = Accountant()
    for _ in range(30):
        ours.step(1.1, 1.0)
    assert ours.history == [(1.1, 1.0, 30)]
    assert ours.epsilon(1e-5) == pytest.approx(_closed_form_gaussian_epsilon(1.1, 30, 1e-5))
    # Subsampled: the value Opacus' RDP accountant gives for the same steps.
    lib = RDPAccountant()
    ours = Accountant()
    for _ in range(500):
        lib.step(noise_multiplier=1.1, sample_rate=256 / 60000)
        ours.step(1.1, 256 / 60000)
    assert ours.epsilon(1e-5) == pytest.approx(lib.get_epsilon(delta=1e-5), rel=1e-12)
    prv = PRVAccountant()
    mine = Accountant("prv")
    for _ in range(200):
        prv.step(noise_multiplier=0.9, sample_rate=0.05)
        mine.step(0.9, 0.05)
    assert mine.epsilon(1e-5) == pytest.approx(prv.get_epsilon(delta=1e-5), rel=1e-6)
    # A restarted party carries on counting from the saved history.
    again = Accountant.from_state(mine.state_dict())
    assert again.epsilon(1e-5) == pytest.approx(mine.epsilon(1e-5), rel=1e-9)
    assert Accountant().epsilon(1e-5) == 0.0
    noiseless = Accountant()
    noiseless.step(0.0, 1.0)
    assert noiseless.epsilon(1e-5) == math.inf


def test_the_noise_for_a_target_epsilon_spends_at_most_the_target() -> None:
    z = noise_multiplier_for(3.0, 1e-5, 0.1, 100)
    spent = Accountant()
    spent.step(z, 0.1, 100)
    assert 2.95 <= spent.epsilon(1e-5) <= 3.0


def test_settings_are_checked_with_hints() -> None:
    with pytest.raises(SettingError, match="give noise_multiplier, target_epsilon or both"):
        DifferentialPrivacy()
    with pytest.raises(SettingError, match="delta must be a finite number > 0 and < 1"):
        DifferentialPrivacy(1.0, delta=1.5)
    with pytest.raises(SettingError, match="clip must be a finite number > 0"):
        DifferentialPrivacy(1.0, clip=0)
    with pytest.raises(SettingError, match="accountant must be one of 'rdp', 'prv'"):
        LocalDP(1.0, accountant="gdp-ish")
    with pytest.raises(SettingError, match="target_quantile must be a finite number > 0"):
        AdaptiveClipping(target_quantile=1.0)
    assert DifferentialPrivacy(target_epsilon=8).noise_multiplier is None
    assert DifferentialPrivacy(1.0, AdaptiveClipping()).adaptive


def test_central_dp_keeps_the_models_dtypes() -> None:
    glob = {"h": torch.zeros(4, dtype=torch.float16), "d": torch.zeros(3, dtype=torch.float64)}
    stat = ClippedMean(glob, 1.0, 0.1, 0.0, noise_generator(0))
    stat.add(ClientUpdate("c1", {k: v + 0.25 for k, v in glob.items()}, num_samples=1))
    mean = stat.result().mean
    assert mean["h"].dtype == torch.float16 and mean["d"].dtype == torch.float64


def test_adaptive_clippings_count_has_sensitivity_one_half() -> None:
    """The noised fraction comes from sum(b_i - 1/2): one client more or less moves that
    sum by exactly 1/2, the sensitivity the noise split assumes."""

    def centred(norms: list[float]) -> float:
        stat = ClippedMean({"w": torch.zeros(1)}, 1.0, 0.0, 0.0, noise_generator(0))
        for i, n in enumerate(norms):
            stat.add(ClientUpdate(f"c{i}", {"w": torch.tensor([n])}, num_samples=1))
        fraction = stat.noised_fraction()  # no count noise: the exact fraction
        assert fraction == pytest.approx(sum(n <= 1.0 for n in norms) / len(norms))
        return (fraction - 0.5) * len(norms)

    base = [0.5, 2.0, 0.7, 3.0]
    for extra in (0.1, 5.0):  # a client whose update fits, and one that is clipped
        assert abs(centred([*base, extra]) - centred(base)) == pytest.approx(0.5)


def test_a_budget_one_round_exceeds_is_named_and_zero_noise_cannot_keep_one() -> None:
    rounds = PrivateRounds(DifferentialPrivacy(noise_multiplier=0.5, target_epsilon=1.0), None, 5)
    reason = rounds.stop_reason(4, 4)
    assert reason is not None and "target_epsilon=1 reached" in reason
    with pytest.raises(SettingError, match="noise_multiplier=0 spends an infinite epsilon"):
        DifferentialPrivacy(noise_multiplier=0.0, target_epsilon=8.0)
    with pytest.raises(SettingError, match="noise_multiplier=0 spends an infinite epsilon"):
        LocalDP(0.0, target_epsilon=8.0)


def test_a_malformed_round_noise_is_named_with_the_rule() -> None:
    from lightning_fed.privacy.dp_settings import DistributedNoise

    assert DistributedNoise.parse({"clip": 1, "std": 0.5}) == DistributedNoise(1.0, 0.5)
    both = DistributedNoise(1.0, 0.5, 0.25)
    assert DistributedNoise.parse(both.to_body()) == both
    assert "count_std" not in DistributedNoise(1.0, 0.5).to_body()  # as before adaptive
    bad = (
        {"clip": True, "std": 0.1},
        {"clip": 1.0},
        {"clip": 1.0, "std": -1},
        [1, 2],
        {"clip": 1.0, "std": 0.1, "count_std": -0.5},
        {"clip": 1.0, "std": 0.1, "count_std": "x"},
    )
    for body in bad:
        with pytest.raises(ValueError, match="need an object with a number 'clip' > 0"):
            DistributedNoise.parse(body)


def test_distributed_adaptive_clipping_shares_the_count_noise_and_follows_the_rule() -> None:
    """Under secure aggregation each of m clients adds 1/sqrt(m) of both noises (the
    updates' with the multiplier left after the count's share of the budget); the
    secure mean of the centred, noised indicators plus 1/2 is the fraction the clip
    follows, and the count is taken out of the aggregate's extras."""
    from lightning_fed.privacy.dp_settings import UNCLIPPED_EXTRA, DistributedNoise

    adaptive = AdaptiveClipping(initial=0.2, learning_rate=0.5, count_stddev=1.0)
    dp = DifferentialPrivacy(noise_multiplier=1.0, clip=adaptive)
    secure = SecureAggregation(clip=3.0, bits=20)
    rounds = PrivateRounds(dp, secure, 5)
    assert rounds.secure_extras() == {UNCLIPPED_EXTRA: TensorSpec((1,), torch.float32)}
    assert PrivateRounds(DifferentialPrivacy(1.0, clip=0.5), secure, 5).secure_extras() == {}
    assert PrivateRounds(dp, None, 5).secure_extras() == {}  # central DP counts itself
    noise = rounds.round_noise(4)
    z = update_noise_multiplier(1.0, 1.0)
    assert noise == DistributedNoise(0.2, z * 0.2 / 2, 1.0 / 2)
    extras = {UNCLIPPED_EXTRA: torch.tensor([-0.3]), "other": torch.zeros(2)}
    spent = rounds.finish_round(4, 4, 4, extras)
    assert spent.unclipped_fraction == pytest.approx(0.2)
    assert rounds.clip == pytest.approx(0.2 * math.exp(-0.5 * (0.2 - 0.5)))
    assert set(extras) == {"other"}
    assert spent.noise_multiplier == 1.0 and spent.clip == 0.2


def test_distributed_adaptive_clipping_refuses_a_secure_range_too_narrow_for_the_count() -> None:
    """The count's extra (+-1/2 plus each client's share of count noise 2.0 / sqrt(3))
    must fit secure aggregation's clip, as the update's coordinates must."""
    from lightning_fed.fedavg.errors import FedAvgError

    adaptive = AdaptiveClipping(initial=0.01, count_stddev=2.0)
    dp = DifferentialPrivacy(noise_multiplier=0.1, clip=adaptive)
    rounds = PrivateRounds(dp, SecureAggregation(clip=1.0, bits=20), 5)
    with pytest.raises(FedAvgError, match="the count of unclipped updates reaches 1/2"):
        rounds.setup(
            FedAvg(), ModelSpec({"w": TensorSpec((3,), torch.float32)}, frozenset({"w"})), 3, 3, 3
        )
    wide = PrivateRounds(dp, SecureAggregation(clip=5.2, bits=20), 5)
    wide.setup(
        FedAvg(), ModelSpec({"w": TensorSpec((3,), torch.float32)}, frozenset({"w"})), 3, 3, 3
    )


def test_recovery_refuses_other_settings_and_counts_rounds_after_the_checkpoint(
    tmp_path: Path,
) -> None:
    """A checkpoint of other privacy settings is refused; a ledger that recorded a round
    the checkpoint missed (a crash in between) wins, so that round stays counted."""
    from lightning_fed.fedavg.errors import FedAvgError

    dp = DifferentialPrivacy(noise_multiplier=1.0, clip=0.5)
    first = PrivateRounds(dp, None, 10, ledger=tmp_path / "ledger.json")
    first.statistic({"w": torch.zeros(1)}, 2)
    first.finish_round(2, 2, 2)
    checkpoint = first.state_dict()  # saved with round 1
    first.statistic({"w": torch.zeros(1)}, 2)
    first.finish_round(2, 2, 2)  # round 2 released; the crash comes before its checkpoint
    again = PrivateRounds(dp, None, 10, ledger=tmp_path / "ledger.json")
    again.load_state_dict(checkpoint)
    assert again.accountant.steps == 2
    other = PrivateRounds(DifferentialPrivacy(noise_multiplier=2.0, clip=0.5), None, 10)
    with pytest.raises(FedAvgError, match="made with differential privacy"):
        other.load_state_dict(checkpoint)
