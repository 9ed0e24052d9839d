"""Ids, URLs and keys are checked where they enter: at construction, before any I/O."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_fed import FedAvgStrategy
from lightning_fed.channel import InvalidNameError, validate_name
from lightning_fed.cli import main as cli_main
from lightning_fed.errors import SettingError
from lightning_fed.hetero import HeteroNNStrategy
from lightning_fed.node import check_channel_url


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"node_id": "../../x"}, "node id '../../x'"),
        ({"task_id": "../t"}, "task id '../t'"),
        ({"node_id": "CON"}, "device name"),
        ({"node_id": "nul.txt"}, "device name"),
        ({"node_id": "client."}, "would collide with 'client'"),
        ({"node_id": "client "}, "would collide with 'client'"),
        ({"aggregator": "../agg"}, "aggregator node id"),
    ],
)
def test_fedavg_strategy_refuses_unsafe_ids_at_construction(
    kwargs: dict[str, str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = {"task_id": "t", "node_id": "a", "role": "client", **kwargs}
    with pytest.raises(SettingError, match=named.replace(".", r"\.").replace("(", r"\(")):
        FedAvgStrategy("fl", **args)
    assert list(tmp_path.iterdir()) == []  # nothing was created or read


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"role": "host", "collaborators": ["", "../x"]}, "collaborator node id ''"),
        ({"role": "host", "collaborators": ["ok", "../x"]}, "collaborator node id '../x'"),
        ({"role": "host", "collaborators": "c1"}, "a list of node ids"),
        ({"role": "host", "collaborators": ["c1", "c1"]}, "distinct"),
        ({"role": "host", "collaborators": ["h"]}, "distinct"),
        ({"role": "collaborator", "host": "../h"}, "host node id '../h'"),
        ({"role": "collaborator", "host": "h", "task_id": "AUX"}, "device name"),
    ],
)
def test_hetero_strategy_refuses_unsafe_ids_at_construction(
    kwargs: dict[str, object], named: str
) -> None:
    args: dict[str, object] = {"task_id": "t", "node_id": "h", **kwargs}
    with pytest.raises(SettingError, match=named.replace(".", r"\.")):
        HeteroNNStrategy("fl", **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["CON", "con", "Prn", "AUX.log", "NUL", "COM1", "lpt9.x"])
def test_windows_device_names_are_refused_with_the_reason(name: str) -> None:
    with pytest.raises(InvalidNameError, match="Windows reserves"):
        validate_name(name, "node id")


@pytest.mark.parametrize("name", ["console", "COM10", "nullable", "con-1", "a.b", "client-1"])
def test_names_that_only_resemble_device_names_are_fine(name: str) -> None:
    assert validate_name(name, "node id") == name


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("s3:/bucket/path", "s3://bucket/path"),
        ("s3:bucket/path", "s3://bucket/path"),
        ("gs:/b", "gs://b"),
        ("file:/tmp/x", "file://tmp/x"),
    ],
)
def test_local_paths_that_look_like_urls_are_refused_with_a_hint(url: str, hint: str) -> None:
    with pytest.raises(SettingError, match=f"channel='{hint}'"):
        check_channel_url(url)
    with pytest.raises(SettingError, match="looks like a URL scheme"):
        FedAvgStrategy(url, task_id="t", node_id="a", role="client")


@pytest.mark.parametrize(
    "url", ["s3://bucket/fl", "fl", "./s3/x", "/tmp/fl", "file:///tmp/fl", "C:/fed", "memory://x"]
)
def test_real_urls_and_paths_pass(url: str) -> None:
    assert check_channel_url(url) == url


def test_keys_federation_checks_every_id_before_writing(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert (
        cli_main(
            ["keys", "federation", "--task-id", "t", "--nodes", "agg", "../x", "--dir", str(keys)]
        )
        == 1
    )
    assert not keys.exists() or list(keys.iterdir()) == []
    assert (
        cli_main(
            ["keys", "federation", "--task-id", "t", "--nodes", "agg", "c1", "--dir", str(keys)]
        )
        == 0
    )
    assert sorted(p.name for p in keys.iterdir()) == [
        "agg.key",
        "agg.pub",
        "c1.key",
        "c1.pub",
        "task.json",
    ]


def test_keys_federation_refuses_a_node_listed_twice_or_keys_present(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert (
        cli_main(["keys", "federation", "--task-id", "t", "--nodes", "a", "a", "--dir", str(keys)])
        == 1
    )
    assert cli_main(["keys", "new", "b", "--dir", str(keys)]) == 0
    assert (
        cli_main(["keys", "federation", "--task-id", "t", "--nodes", "a", "b", "--dir", str(keys)])
        == 1
    )
    assert sorted(p.name for p in keys.iterdir()) == ["b.key", "b.pub"]  # a was not written


def test_a_missing_key_names_a_command_the_tool_accepts(tmp_path: Path) -> None:
    import lightning as L

    strategy = FedAvgStrategy(
        str(tmp_path / "fl"), task_id="t", node_id="c1", role="client", keys=tmp_path / "k"
    )
    (tmp_path / "k").mkdir()
    assert (
        cli_main(
            [
                "keys",
                "federation",
                "--task-id",
                "t",
                "--nodes",
                "agg",
                "other",
                "--dir",
                str(tmp_path / "k"),
            ]
        )
        == 0
    )
    trainer = L.Trainer(strategy=strategy, logger=False, default_root_dir=tmp_path)
    from tests.fedavg.parties import TinyNet, dataset  # a tiny real model

    with pytest.raises(Exception, match="no private key") as info:
        trainer.fit(TinyNet(), torch_loader(dataset(0, 8)))
    hint = str(info.value).split("`")[1]
    assert hint.startswith("lightning-fed keys new c1 ")
    assert cli_main(hint.split()[1:]) == 0  # the hint works as given


def torch_loader(data: object) -> object:
    from torch.utils.data import DataLoader

    return DataLoader(data, batch_size=4)  # type: ignore[arg-type]


def test_yaml_option_errors_are_one_line_with_the_hint(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[2] / "examples" / "digits" / "aggregator.yaml"
    cases = {
        "calculation_timeout=0": "calculation_timeout must be a finite number",
        "rounds=-3": "rounds must be an int >= 1, got -3",
        "node_id=../x": "invalid node id '../x'",
        "channel=s3:/bucket/fl": "channel='s3://bucket/fl'",
    }
    runs = {  # side by side: each is a Python start-up with Lightning
        override: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lightning_fed.party",
                "--config",
                str(config),
                f"--trainer.strategy.init_args.{override}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for override in cases
    }
    for override, proc in runs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr
        lines = [line for line in stderr.splitlines() if not line.startswith("Seed set")]
        assert len(lines) == 1, stderr  # one line, no traceback
        assert lines[0].startswith("lightning-fed party: error in the configuration: ")
        assert cases[override] in lines[0], stderr
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_check_says_how_to_make_a_missing_bucket_then_makes_it(
    s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import uuid

    from lightning_fed.testing import s3_storage_options

    url = f"s3://lf-new-{uuid.uuid4().hex[:12]}/federation"
    options = ["--storage-options", json.dumps(s3_storage_options(s3_endpoint))]
    assert cli_main(["check", url, *options]) == 1
    said = capsys.readouterr().err
    assert "the bucket must exist before any party starts" in said
    assert f"lightning-fed check {url} --create-bucket" in said
    assert cli_main(["check", url, *options, "--create-bucket"]) == 0
    out = capsys.readouterr().out
    assert "bucket " in out and "created" in out and "ready for a federation" in out
    assert cli_main(["check", url, *options]) == 0  # now it exists: every step passes
    assert "ok: listing shows it at once" in capsys.readouterr().out


def test_check_refuses_a_url_missing_its_slashes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["check", "s3:/bucket/fl"]) == 1
    assert "channel='s3://bucket/fl'" in capsys.readouterr().err
