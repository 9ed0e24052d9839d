"""Progress is visible by default: INFO lines without any logging set up, and waits that say
what they wait for and for how much longer."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_fed.channel import Channel, NodeIdentity, TaskConfig
from lightning_fed.fedavg.client import ClientRole
from lightning_fed.fedavg.config import FedAvgConfig
from lightning_fed.fedavg.errors import FedAvgError

SAY = "import logging, lightning_fed; logging.getLogger('lightning_fed.fedavg').info('round 1/3')"


def test_info_lines_show_without_any_logging_set_up() -> None:
    done = subprocess.run([sys.executable, "-c", SAY], capture_output=True, text=True, timeout=60)
    assert done.stderr.splitlines() == ["round 1/3"]


def test_an_application_that_configures_logging_gets_each_line_once() -> None:
    configured = "import logging; logging.basicConfig(format='app: %(message)s', level='INFO'); "
    done = subprocess.run(
        [sys.executable, "-c", configured + SAY], capture_output=True, text=True, timeout=60
    )
    assert done.stderr.splitlines() == ["app: round 1/3"]  # its own format, not twice


def test_a_client_without_an_aggregator_says_it_waits_and_for_how_long(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lightning_fed.logs.NOTICE_EVERY", 0.4)
    ids = {n: NodeIdentity.generate(n) for n in ("agg", "c1")}
    task = TaskConfig("t", {n: i.public_key_text for n, i in ids.items()})
    channel = Channel(str(tmp_path / "channel"), task, ids["c1"]).connect()
    role = ClientRole(channel, FedAvgConfig(role="client", schedule_timeout=2.0))
    with caplog.at_level(logging.INFO, "lightning_fed"), pytest.raises(FedAvgError):
        role.check_in()
    said = [r.getMessage() for r in caplog.records]
    assert "client c1: checking in with the aggregator (up to 2 s)" in said
    waits = [m for m in said if m.startswith("client c1: still waiting for an aggregator (up to")]
    assert 2 <= len(waits) <= 6  # every 0.4 s, not on every poll
