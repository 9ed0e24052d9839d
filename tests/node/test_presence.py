"""One live process per node id: claims in real storage, real PIDs, real heartbeats."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lightning_fed.channel import Channel, NodeIdentity, TaskConfig
from lightning_fed.node import NodeBusyError, Presence
from lightning_fed.node.presence import pid_runs
from lightning_fed.simulate import make_keys
from tests.conftest import Backend

IDS = {n: NodeIdentity.generate(n) for n in ("agg", "c1")}
TASK = TaskConfig("t", {n: i.public_key_text for n, i in IDS.items()})


def channel(backend: Backend, node: str = "agg") -> Channel:
    return Channel(backend.url, TASK, IDS[node], storage_options=backend.storage_options).connect()


def claims(backend: Backend, node: str = "agg") -> list[str]:
    return channel(backend).store.list_keys(f"t/presence/{node}")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_live_process_is_refused_naming_the_first(backend: Backend) -> None:
    first = Presence(channel(backend))
    first.acquire()
    try:
        second = Presence(channel(backend))
        with pytest.raises(NodeBusyError) as info:
            second.acquire()
        said = str(info.value)
        assert f"already runs as instance {first.claim.instance}" in said
        assert f"pid {first.claim.pid} on host {first.claim.host}" in said
        assert "last seen" in said and "hint: run each node id once" in said
        assert claims(backend) == [f"t/presence/agg/{first.claim.instance}.json"]  # kept
    finally:
        first.release()
    assert claims(backend) == []


def test_other_nodes_and_a_released_claim_do_not_block(backend: Backend) -> None:
    agg = Presence(channel(backend, "agg"))
    agg.acquire()
    c1 = Presence(channel(backend, "c1"))
    c1.acquire()  # another node id: no conflict
    agg.release()
    again = Presence(channel(backend, "agg"))
    again.acquire()  # a clean stop left nothing behind
    again.release()
    c1.release()


def test_a_crashed_process_on_this_machine_is_taken_over_at_once(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    crashed = Presence(channel(backend))
    crashed.claim = replace(crashed.claim, pid=dead_pid())
    crashed._write(crashed.claim)  # as a SIGKILLed process leaves it: no heartbeat, no release
    assert not pid_runs(crashed.claim.pid)
    started = time.monotonic()
    restarted = Presence(channel(backend), stale_after=60)
    restarted.acquire()
    assert time.monotonic() - started < 30  # not the 60 s a remote claim would need
    assert "is stale (its process is gone); taking over" in caplog.text
    assert claims(backend) == [f"t/presence/agg/{restarted.claim.instance}.json"]
    restarted.release()


def test_another_machine_decides_by_the_heartbeat(backend: Backend) -> None:
    live = Presence(channel(backend), heartbeat=0.2)
    live.claim = replace(live.claim, machine="another-host/boot/ns")
    live.acquire()
    try:
        with pytest.raises(NodeBusyError, match=live.claim.instance):
            Presence(channel(backend), heartbeat=0.2, stale_after=3).acquire()
    finally:
        live._stop.set()  # the process "dies": its heartbeat stops, its claim stays
        assert live._thread is not None
        live._thread.join()
    silent = Presence(channel(backend), stale_after=1.5)
    silent.acquire()  # no heartbeat within stale_after: the claim is dead
    assert claims(backend) == [f"t/presence/agg/{silent.claim.instance}.json"]
    silent.release()


def test_a_claim_not_signed_by_the_node_is_ignored(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    forger = Presence(channel(backend, "c1"))
    forger.identity = NodeIdentity("agg", IDS["c1"].private_key)  # agg's id, c1's key
    forger.claim = replace(forger.claim, node_id="agg")
    forger._write(forger.claim)
    honest = Presence(channel(backend))
    honest.acquire()  # not blocked by the forgery
    assert "did not sign" in caplog.text
    honest.release()


RACER = """
import sys, time
from lightning_fed.channel import Channel, NodeIdentity, TaskConfig
from lightning_fed.node import NodeBusyError, Presence
keys, url = sys.argv[1], sys.argv[2]
task = TaskConfig.load(keys + "/task.json")
presence = Presence(Channel(url, task, NodeIdentity.load(keys + "/agg.key")).connect())
try:
    presence.acquire()
except NodeBusyError:
    sys.exit(3)
time.sleep(3)
presence.release()
"""


def test_of_processes_started_together_exactly_one_runs(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, "t", ["agg"])
    url = str(tmp_path / "fed")
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(keys), url]) for _ in range(3)]
    assert sorted(p.wait(timeout=120) for p in racers) == [0, 3, 3]
