"""SecureAggregation's settings: clear errors up front, the round's announcement, a
client's requirement, and the algorithms it cannot run."""

from __future__ import annotations

import pytest

from lightning_fed import FedAvgStrategy
from lightning_fed.algorithms import FedAdam, Krum, Median, TrimmedMean
from lightning_fed.errors import SettingError
from lightning_fed.fedavg import protocol as P
from lightning_fed.fedavg.errors import FedAvgError
from lightning_fed.fedavg.secure_client import secure_round_of
from lightning_fed.privacy import SecureAggregation
from lightning_fed.privacy.settings import SecureRound


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip": 0}, "clip must be a finite number > 0"),
        ({"bits": 1}, "bits must be in"),
        ({"max_samples": 0}, "max_samples must be an int >= 1"),
        ({"degree": 1}, "degree must be None or an int >= 2"),
        ({"threshold": 0.3}, "threshold must be in [0.5, 1)"),
        ({"timeout": -1}, "timeout must be seconds > 0"),
    ],
)
def test_bad_settings_are_refused_with_the_value_and_the_rule(
    kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(SettingError, match=message.replace("[", r"\[").replace(")", r"\)")):
        SecureAggregation(**kwargs)  # type: ignore[arg-type]


def test_a_modulus_that_cannot_hold_the_sum_is_refused_naming_the_settings() -> None:
    with pytest.raises(SettingError, match=r"need a 65-bit modulus.*lower bits, or max_samples"):
        SecureAggregation(bits=32, max_samples=2**30).check_clients(4)


def test_the_round_announces_its_settings_and_clients_parse_them() -> None:
    spec = SecureAggregation(clip=0.5, bits=12, max_samples=1000).for_round(7)
    assert spec.modulus_bits == 12 + 13  # 7 * 1000 < 2**13
    assert SecureRound.parse(spec.to_body()) == spec
    with pytest.raises(ValueError, match="do not fit"):
        SecureRound.parse({**spec.to_body(), "bits": "many"})


@pytest.mark.parametrize("algorithm", [Median(), TrimmedMean(beta=0.2), Krum(byzantine=1)])
def test_robust_aggregation_is_refused_saying_why(algorithm: object) -> None:
    with pytest.raises(SettingError, match="needs every client's update"):
        FedAvgStrategy(
            "memory://x",
            "t",
            "agg",
            "aggregator",
            algorithm=algorithm,  # type: ignore[arg-type]
            secure_aggregation=SecureAggregation(),
        )


def test_a_server_optimiser_is_accepted() -> None:
    FedAvgStrategy(
        "memory://x",
        "t",
        "agg",
        "aggregator",
        algorithm=FedAdam(lr=0.01),
        secure_aggregation=SecureAggregation(),
    )


def start(secure: dict[str, object] | None) -> P.RoundStart:
    return P.RoundStart("a", 1, {}, None, {"name": "fedavg", "params": {}}, False, "keep", secure)


def test_a_client_that_requires_it_refuses_a_plain_or_weaker_round() -> None:
    with pytest.raises(FedAvgError, match=r"requires secure aggregation, but .* plain FedAvg"):
        secure_round_of(start(None), SecureAggregation(), "c1")
    weak = SecureAggregation(threshold=0.5).for_round(5).to_body()
    with pytest.raises(FedAvgError, match=r"threshold of at least 0\.7"):
        secure_round_of(start(weak), SecureAggregation(threshold=0.7), "c1")
    assert secure_round_of(start(None), None, "c1") is None
    assert secure_round_of(start(weak), SecureAggregation(), "c1") is not None
