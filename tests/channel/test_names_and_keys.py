"""Safe names, key files, task configurations and the `lightning-fed` key/storage commands."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from lightning_fed.channel import (
    Channel,
    ChannelError,
    ConfigError,
    InvalidNameError,
    NodeIdentity,
    TaskConfig,
    validate_name,
)
from lightning_fed.channel.names import validate_tensor_name
from lightning_fed.channel.polling import Backoff
from lightning_fed.cli import main

BAD_NAMES = [
    "",
    "a/b",
    "..",
    "a..b",
    "../etc",
    ".hidden",
    "-x",
    "a b",
    "x\n",
    "tab\t",
    "é",
    "a" * 129,
    "a\\b",
    "nul\x00",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(InvalidNameError, match="must be 1 to 128 characters"):
        validate_name(name, "node id")


@pytest.mark.parametrize("name", ["hospital-a", "c1", "round.update", "A_b-9", "a" * 128])
def test_safe_names_pass(name: str) -> None:
    assert validate_name(name) == name


def test_non_string_names_are_refused() -> None:
    with pytest.raises(InvalidNameError, match="must be a string"):
        validate_name(3, "node id")


def test_names_are_checked_everywhere_they_enter() -> None:
    with pytest.raises(InvalidNameError, match="node id"):
        NodeIdentity.generate("a/b")
    good = NodeIdentity.generate("a")
    with pytest.raises(InvalidNameError, match="task id"):
        TaskConfig("../t", {"a": good.public_key_text})
    with pytest.raises(InvalidNameError, match="node id"):
        TaskConfig("t", {"x/y": good.public_key_text})


def test_tensor_names_allow_state_dict_keys_only_printable() -> None:
    assert validate_tensor_name("features.0.weight") == "features.0.weight"
    for bad in ["", "a\nb", "x" * 1025]:
        with pytest.raises(InvalidNameError, match="tensor name"):
            validate_tensor_name(bad)


def test_key_files_round_trip_and_are_private(tmp_path: Path) -> None:
    ident = NodeIdentity.generate("hospital-a")
    private, public = ident.save(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    loaded = NodeIdentity.load(private)
    assert loaded.node_id == "hospital-a"
    assert loaded.public_key_text == public.read_text().strip() == ident.public_key_text
    with pytest.raises(ConfigError, match="never overwritten"):
        ident.save(tmp_path)
    with pytest.raises(ConfigError, match="cannot read private key"):
        NodeIdentity.load(tmp_path / "missing.key")
    (tmp_path / "bad.key").write_text("nope")
    with pytest.raises(ConfigError, match="not an unencrypted PEM"):
        NodeIdentity.load(tmp_path / "bad.key")


def test_task_config_round_trip_and_errors(tmp_path: Path) -> None:
    a, b = NodeIdentity.generate("a"), NodeIdentity.generate("b")
    cfg = TaskConfig("t", {"a": a.public_key_text, "b": b.public_key_text})
    assert TaskConfig.load(cfg.save(tmp_path / "task.json")) == cfg
    with pytest.raises(ConfigError, match="not a base64 raw Ed25519"):
        TaskConfig("t", {"a": "not-a-key"})
    with pytest.raises(ConfigError, match="lists no nodes"):
        TaskConfig("t", {})
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not JSON"):
        TaskConfig.load(tmp_path / "broken.json")


def test_channel_checks_identity_against_task() -> None:
    a, b = NodeIdentity.generate("a"), NodeIdentity.generate("b")
    cfg = TaskConfig("t", {"a": a.public_key_text})
    with pytest.raises(ChannelError, match="not part of task"):
        Channel("memory://x", cfg, b)
    with pytest.raises(ChannelError, match="does not match its public key"):
        Channel("memory://x", cfg, NodeIdentity("a", b.private_key))
    with pytest.raises(ChannelError, match="not connected"):
        Channel("memory://x", cfg, a).poll()


def test_backoff_starts_small_caps_and_respects_deadline() -> None:
    b = Backoff(0.001, 0.05, deadline_in=0.3)
    intervals = []
    while True:
        intervals.append(b.interval)
        if not b.sleep():
            break
    assert intervals[0] == 0.001
    assert max(intervals) <= 0.05
    assert b.remaining() == 0
    with pytest.raises(ValueError, match="initial <= maximum"):
        Backoff(0.5, 0.1)


def test_cli_makes_federation_and_manages_storage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert (
        main(
            ["keys", "federation", "--task-id", "demo", "--nodes", "agg", "c1", "--dir", str(keys)]
        )
        == 0
    )
    cfg = TaskConfig.load(keys / "task.json")
    assert cfg.node_ids == ["agg", "c1"]
    assert main(["keys", "new", "c2", "--dir", str(keys)]) == 0
    out = tmp_path / "task2.json"
    assert (
        main(
            [
                "keys",
                "task",
                "--task-id",
                "demo",
                *map(str, sorted(keys.glob("*.pub"))),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert TaskConfig.load(out).node_ids == ["agg", "c1", "c2"]

    url = (tmp_path / "fed").as_uri()
    with Channel(url, cfg, NodeIdentity.load(keys / "agg.key")) as ch:
        ch.send("hello", {}, to="c1")
    capsys.readouterr()
    assert main(["inspect", url, "--task-id", "demo"]) == 0
    assert "1 unread message(s) agg -> c1" in capsys.readouterr().out
    assert main(["clean", url, "--task-id", "demo"]) == 2  # asks for --yes
    assert main(["clean", url, "--task-id", "demo", "--yes"]) == 0
    assert main(["inspect", url, "--task-id", "demo"]) == 0
    assert "(empty)" in capsys.readouterr().out
    assert main(["inspect", url, "--task-id", "../x"]) == 1


def test_storage_without_atomic_publish_is_refused() -> None:
    from lightning_fed.channel import Store

    with pytest.raises(ConfigError, match="cannot publish atomically"):
        Store("http://127.0.0.1:9/fed")


def test_broadcast_in_a_single_node_task_is_an_error() -> None:
    a = NodeIdentity.generate("a")
    ch = Channel("memory://single", TaskConfig("t", {"a": a.public_key_text}), a).connect()
    with pytest.raises(ChannelError, match="reach nobody"):
        ch.send("x", {})


def test_bodies_that_would_change_in_transit_are_refused() -> None:
    a, b = NodeIdentity.generate("a"), NodeIdentity.generate("b")
    task = TaskConfig("t", {"a": a.public_key_text, "b": b.public_key_text})
    ch = Channel("memory://bodies", task, a).connect()
    with pytest.raises(TypeError, match="round trip"):
        ch.send("x", {1: "int key"}, to="b")  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="round trip"):
        ch.send("x", {"t": (1, 2)}, to="b")


def test_task_config_without_task_id_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text('{"nodes": {}}')
    with pytest.raises(ConfigError, match="task_id"):
        TaskConfig.load(tmp_path / "t.json")


def test_cli_reports_bad_urls_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "nosuchproto://x", "--task-id", "t"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lightning-fed: error:") and "Traceback" not in err
