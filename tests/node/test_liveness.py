"""A waiting party learns that a peer's process is gone from its presence claim."""

from __future__ import annotations

import time
from dataclasses import replace

from lightning_fed.node import Presence
from lightning_fed.node.liveness import PeerWatch
from tests.conftest import Backend
from tests.node.test_presence import channel, dead_pid


def test_a_live_peer_is_not_gone_and_one_without_a_claim_is(backend: Backend) -> None:
    peer = Presence(channel(backend, "c1"))
    peer.acquire()
    try:
        watch = PeerWatch(channel(backend), every=0.0)
        assert watch.gone(["c1"]) == {}
        peer.release()
        assert watch.gone(["c1"]) == {"c1": "it holds no presence claim: its process ended"}
    finally:
        peer.release()


def test_a_killed_process_on_this_machine_is_gone_at_the_first_look(backend: Backend) -> None:
    peer = Presence(channel(backend, "c1"))
    peer.claim = replace(peer.claim, pid=dead_pid())
    peer._write(peer.claim)  # a claim left behind by a process killed without a word
    watch = PeerWatch(channel(backend), every=0.0)
    gone = watch.gone(["c1"])
    assert "is gone" in gone["c1"] and f"pid {peer.claim.pid} on this machine" in gone["c1"]


def test_a_claim_from_elsewhere_is_gone_once_it_stops_beating(backend: Backend) -> None:
    peer = Presence(channel(backend, "c1"))
    peer.claim = replace(peer.claim, machine="another-machine", host="node-7")
    peer._write(peer.claim)
    watch = PeerWatch(channel(backend), every=0.0, stale_after=0.5)
    assert watch.gone(["c1"]) == {}  # beating as far as anyone knows
    peer._write(replace(peer.claim, beat=1))
    time.sleep(0.3)
    assert watch.gone(["c1"]) == {}  # it beat since the last look
    time.sleep(0.6)
    assert "has not beaten for" in watch.gone(["c1"])["c1"]


def test_looks_are_spaced(backend: Backend) -> None:
    watch = PeerWatch(channel(backend), every=60.0)
    assert watch.gone(["c1"]) == {}  # not yet time to look, though c1 has no claim
