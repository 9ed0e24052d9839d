"""``python -m lightning_fed.party``: each party started by hand from its own YAML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_fed.simulate import make_keys
from lightning_fed.testing import make_bucket, s3_storage_options

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
pytestmark = pytest.mark.timeout(300)


def party_yaml(path: Path, example: Path, strategy: dict[str, Any], data: dict[str, Any]) -> Path:
    """The example's config with this deployment's strategy and data settings."""
    config = yaml.safe_load(example.read_text())
    config["trainer"]["strategy"]["init_args"].update(strategy)
    config["data"]["init_args"].update(data)
    path.write_text(yaml.safe_dump(config))
    return path


def without_aws_variables() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = str(DIGITS)
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_s3_parties_from_their_own_yaml_with_credentials_only_in_storage_options(
    tmp_path: Path, s3_endpoint: str
) -> None:
    url = f"s3://{make_bucket(s3_endpoint)}/federation"
    keys = make_keys(tmp_path, "digits-s3", ["coordinator", "hospital-a"])
    common = {
        "channel": url,
        "task_id": "digits-s3",
        "keys": str(keys),
        "storage_options": s3_storage_options(s3_endpoint),  # credentials live only here
        "schedule_timeout": 240,
    }
    agg = party_yaml(
        tmp_path / "coordinator.yaml",
        DIGITS / "aggregator.yaml",
        {
            **common,
            "node_id": "coordinator",
            "rounds": 1,
            "min_clients": 1,
            "clients": 1,
            "algorithm": {  # chosen on the aggregator only; the client learns it
                "class_path": "lightning_fed.algorithms.FedProx",
                "init_args": {"mu": 0.05},
            },
        },
        {"num_clients": 1},
    )
    client = party_yaml(
        tmp_path / "hospital-a.yaml",
        DIGITS / "client.yaml",
        {**common, "node_id": "hospital-a"},
        {"num_clients": 1, "client_index": 0},
    )
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lightning_fed.party",
                "--config",
                str(cfg),
                f"--trainer.default_root_dir={tmp_path / name}",
            ],
            env=without_aws_variables(),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, cfg in (("coordinator", agg), ("hospital-a", client))
    }
    outputs = {name: proc.communicate(timeout=280)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{outputs[name]}"
    report = json.loads(
        (
            tmp_path / "coordinator" / "fedavg" / "digits-s3" / "coordinator" / "report.json"
        ).read_text()
    )
    assert report["rounds_completed"] == 1 and report["clients"] == ["hospital-a"]
    assert report["algorithm"] == {"name": "fedprox", "params": {"mu": 0.05}}
    assert "algorithm FedProx(mu=0.05)" in outputs["hospital-a"]
    assert "the global model's test: test_acc=" in outputs["hospital-a"]


def test_the_aggregator_tests_only_with_a_test_step_and_test_data() -> None:
    """A data-less aggregator, or a model without test_step, skips its final test."""
    import lightning.pytorch as L
    from torch.utils.data import DataLoader

    from lightning_fed.party import can_test
    from tests.fedavg.parties import TinyNet, dataset

    class NoTest(TinyNet):
        test_step = L.LightningModule.test_step

    class WithTest(L.LightningDataModule):
        def test_dataloader(self) -> DataLoader:
            return DataLoader(dataset(0, 8))

    assert can_test(TinyNet(), WithTest())
    assert not can_test(NoTest(), WithTest())  # exited 1 after all its rounds before
    assert not can_test(TinyNet(), None)  # no datamodule: evaluation is federated only
    assert not can_test(TinyNet(), L.LightningDataModule())
