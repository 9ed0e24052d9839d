"""What a party can train with inside, and the clear refusals of what it cannot."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import pytest
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from lightning_fed import FedAvgStrategy, HeteroNNStrategy
from lightning_fed.errors import LightningFedError, SettingError
from tests.fedavg.parties import TinyNet


def _client(tmp_path: Path, **kwargs: object) -> FedAvgStrategy:
    return FedAvgStrategy(str(tmp_path / "channel"), "t", "c1", "client", **kwargs)  # type: ignore[arg-type]


def test_fedavg_strategy_is_lightnings_own_single_device_or_ddp(tmp_path: Path) -> None:
    single, ddp = _client(tmp_path), _client(tmp_path, strategy="ddp")
    assert isinstance(single, FedAvgStrategy) and isinstance(single, SingleDeviceStrategy)
    assert isinstance(ddp, FedAvgStrategy) and isinstance(ddp, DDPStrategy)
    assert not isinstance(single, DDPStrategy)
    options = _client(tmp_path, strategy="ddp", strategy_options={"find_unused_parameters": True})
    assert options._ddp_kwargs == {"find_unused_parameters": True}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"strategy": "fsdp"}, "FSDP and DeepSpeed shard the model"),
        ({"strategy": "deepspeed_stage_2"}, "FSDP and DeepSpeed shard the model"),
        ({"strategy": "ddp_spawn"}, "use 'ddp'"),
        ({"strategy": "horovod"}, "strategy='ddp'"),
        ({"strategy_options": {"find_unused_parameters": True}}, "add strategy='ddp'"),
        ({"strategy": "ddp", "strategy_options": {"start_method": "spawn"}}, "start_method"),
    ],
)
def test_what_a_party_cannot_train_with_is_refused_at_once(
    tmp_path: Path, kwargs: dict[str, object], words: str
) -> None:
    with pytest.raises(SettingError, match=words):
        _client(tmp_path, **kwargs)


def test_the_aggregator_takes_ddp_and_refuses_sharding_as_a_client_does(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    aggregator = FedAvgStrategy(str(tmp_path), "t", "agg", "aggregator", strategy="ddp")
    assert isinstance(aggregator, DDPStrategy) and aggregator.role == "aggregator"
    with pytest.raises(SettingError, match="FSDP and DeepSpeed shard the model"):
        FedAvgStrategy(str(tmp_path), "t", "agg", "aggregator", strategy="fsdp")


def test_two_devices_without_ddp_are_refused_before_training(tmp_path: Path) -> None:
    trainer = L.Trainer(
        devices=2, accelerator="cpu", strategy=_client(tmp_path), logger=False, max_epochs=1
    )
    with pytest.raises(LightningFedError, match="strategy='ddp'"):
        trainer.fit(TinyNet())


def test_a_hetero_party_on_two_devices_is_refused_before_training(tmp_path: Path) -> None:
    strategy = HeteroNNStrategy(str(tmp_path), "t", "shop", "collaborator", host="bank")
    trainer = L.Trainer(devices=2, accelerator="cpu", strategy=strategy, logger=False)
    with pytest.raises(LightningFedError, match=r"one process on one device.*devices=1"):
        trainer.fit(TinyNet())
