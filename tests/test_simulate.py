"""``lightning-fed simulate``: real parties in real processes, started by the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lightning_fed.simulate import _environment, threads_per_party

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
pytestmark = pytest.mark.timeout(240)


def simulate_command(
    workdir: Path, *extra: str, clients: int = 2, example: Path = DIGITS, task_id: str = "sim"
) -> list[str]:
    """``lightning-fed simulate`` of an example's aggregator.yaml and client.yaml."""
    return [
        sys.executable,
        "-m",
        "lightning_fed.cli",
        "simulate",
        "--aggregator",
        str(example / "aggregator.yaml"),
        "--client",
        str(example / "client.yaml"),
        "--clients",
        str(clients),
        "--task-id",
        task_id,
        "--workdir",
        str(workdir),
        *extra,
    ]


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_threads_per_party_shares_the_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    assert threads_per_party(1) == cores
    assert threads_per_party(cores) == 1
    assert threads_per_party(10 * cores) == 1  # never 0
    assert threads_per_party(0) == cores


def test_threads_setting_explicit_beats_environment_beats_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _environment([], None, 10_000)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _environment([], None, 10_000)["OMP_NUM_THREADS"] == "3"
    assert _environment([], 5, 10_000)["OMP_NUM_THREADS"] == "5"


def test_simulate_runs_a_federation_and_says_where_the_outputs_are(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    done = subprocess.run(
        simulate_command(
            workdir,
            "--aggregator-arg=--trainer.strategy.init_args.rounds=2",
            "--aggregator-arg=--trainer.strategy.init_args.evaluate_on_clients=true",
            "--threads=1",
        ),
        capture_output=True,
        text=True,
        timeout=200,
        cwd=tmp_path,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    lines = out.splitlines()
    assert any(line.startswith("[aggregator] ") for line in lines), out
    assert any(line.startswith("[client-1  ] ") for line in lines), out
    assert any(line.startswith("[client-2  ] ") for line in lines), out
    assert "2 rounds completed; final: test_acc=" in out
    outputs = workdir / "aggregator" / "fedavg" / "sim" / "aggregator"
    assert f"final model:  {outputs / 'final.safetensors'}" in out
    assert f"tensorboard --logdir {workdir / 'aggregator' / 'lightning_logs'}" in out
    report = json.loads((outputs / "report.json").read_text())
    assert report["rounds_completed"] == 2
    assert report["clients"] == ["client-1", "client-2"]
    for client in ("client-1", "client-2"):  # the final model and test reached every client
        theirs = workdir / client / "fedavg" / "sim" / client
        assert (theirs / "final.safetensors").is_file()
        their_report = json.loads((theirs / "report.json").read_text())
        assert their_report["test_metrics"] == report["test_metrics"]
        assert their_report["federated_test_metrics"] == report["federated_test_metrics"]
        assert f"client {client}: the global model's test: test_acc=" in out
    # evaluate_on_clients: the clients validated every round's model on their local
    # validation data, and tested the final model on theirs (here the same holdout as
    # the aggregator's, so the federated test equals the aggregator's own).
    assert all("federated_metrics" in r for r in report["rounds"])
    assert report["federated_test_clients"] == ["client-1", "client-2"]
    federated_acc = report["federated_test_metrics"]["test_acc"]
    assert federated_acc == pytest.approx(report["test_metrics"]["test_acc"], abs=1e-6)
    assert "aggregator: the clients' test of the final model: test_acc=" in out


def test_a_failing_aggregator_stops_the_clients_and_the_exit_code_says_so(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "run"
    started = time.monotonic()
    done = subprocess.run(
        simulate_command(workdir, "--aggregator-arg=--trainer.strategy.init_args.rounds=0"),
        capture_output=True,
        text=True,
        timeout=200,
        cwd=tmp_path,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "rounds" in out  # the aggregator's own error names the bad setting
    assert "aggregator failed (exit 2); stopping every other party" in out
    assert "aggregator: FAILED" in out
    assert "first failure: aggregator: lightning-fed party: error in the configuration: " in out
    # The clients would wait schedule_timeout (120 s) for an acknowledgement.
    assert time.monotonic() - started < 90
    assert processes_mentioning(str(workdir)) == []


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_every_party(tmp_path: Path, stop: signal.Signals) -> None:
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        simulate_command(workdir, "--aggregator-arg=--trainer.strategy.init_args.rounds=500"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        # A test run started in the background (make test &) ignores SIGINT, and Python
        # keeps a signal ignored at startup: give the simulation the default, as a shell would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    seen: list[str] = []
    running = threading.Event()

    def drain() -> None:  # read all the time, so the simulation never blocks on its pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "round 1/500 done" in line:
                running.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    if not running.wait(timeout=120):
        proc.kill()
        pytest.fail("the federation never completed round 1:\n" + "".join(seen))
    assert len(processes_mentioning(str(workdir))) >= 3
    proc.send_signal(stop)
    proc.wait(timeout=120)  # STOP_GRACE, then every party is killed: far less than this
    reader.join(timeout=10)
    out = "".join(seen)
    assert proc.returncode == 130, out
    assert "stopping every party" in out
    assert processes_mentioning(str(workdir)) == []


PLAIN_DATA = """
from digits import DigitsData


class PlainData(DigitsData):
    # A datamodule without the client_index/num_clients arguments that simulate passes.
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__(client_index=0, num_clients=1, batch_size=batch_size)
"""


def test_clients_failing_at_start_up_stop_the_simulation_with_the_cause(tmp_path: Path) -> None:
    (tmp_path / "plain_data.py").write_text(PLAIN_DATA)
    config = (DIGITS / "client.yaml").read_text()
    start, end = config.index("data:"), config.index("trainer:")
    client = tmp_path / "client.yaml"
    client.write_text(config[:start] + "data:\n  class_path: plain_data.PlainData\n" + config[end:])
    workdir = tmp_path / "run"
    command = simulate_command(workdir)
    command[command.index(str(DIGITS / "client.yaml"))] = str(client)
    env = {**os.environ, "PYTHONPATH": str(DIGITS)}
    # The aggregator's schedule_timeout is 120 s: only a simulation that stops at the
    # clients' failure ends within this bound.
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=110, cwd=tmp_path, env=env
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "failed (exit 2); stopping every other party" in out
    assert "first failure: client-" in out and "client_index" in out
    assert "give the client's datamodule these two __init__ arguments" in out
    assert "final model:" not in out and "report:" not in out  # none was written
    assert processes_mentioning(str(workdir)) == []


HALVES = ROOT / "examples" / "digits_halves"


def test_simulate_runs_a_heteronn_task_and_every_party_tests(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_fed.cli",
            "simulate",
            "--host",
            str(HALVES / "host.yaml"),
            "--collaborator",
            str(HALVES / "collaborator.yaml"),
            "--task-id",
            "halves",
            "--workdir",
            str(workdir),
            "--host-arg=--trainer.max_epochs=2",
        ],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=tmp_path,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "simulate: a host and 1 collaborator(s)" in out
    assert any(line.startswith("[host          ] ") for line in out.splitlines()), out
    assert "1200 common IDs (960 train, 240 test)" in out  # the PSI of the two ID ranges
    assert "test_acc" in out and "collaborator-1: ok" in out
    assert "2 epochs on 1200 common IDs" in out  # the summary from the host's report
    assert (workdir / "host" / "lightning_logs").is_dir()
    for node in ("host", "collaborator-1"):
        report = json.loads((workdir / node / "heteronn/halves" / node / "report.json").read_text())
        assert [e["epoch"] for e in report["epochs"]] == [0, 1]
        assert report["traffic"]["bytes_sent"] > 0 and report["common_ids"] == 1200
    assert report["test_metrics"] == {}  # only the host holds labels and metrics


def test_simulate_refuses_mixed_or_missing_options(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "lightning_fed.cli", "simulate", "--workdir", str(tmp_path)]
    mixed = subprocess.run(
        [*base, "--host", "h.yaml", "--collaborator", "c.yaml", "--clients", "2"],
        capture_output=True,
        text=True,
    )
    assert mixed.returncode == 2 and "none of --aggregator/--client/--clients" in mixed.stderr
    missing = subprocess.run([*base, "--aggregator", "a.yaml"], capture_output=True, text=True)
    assert (
        missing.returncode == 2 and "takes --aggregator, --client and --clients" in missing.stderr
    )


def test_simulate_with_ddp_clients_from_the_cli(tmp_path: Path) -> None:
    """Each client a LightningCLI party on 2 DDP ranks: Lightning starts rank 1 by running
    ``python -m lightning_fed.party ...`` again; rank 0 alone talks and logs."""
    workdir = tmp_path / "run"
    done = subprocess.run(
        simulate_command(
            workdir,
            "--aggregator-arg=--trainer.strategy.init_args.rounds=2",
            "--aggregator-arg=--trainer.strategy.init_args.evaluate_on_clients=true",
            "--client-arg=--trainer.devices=2",
            "--client-arg=--trainer.accelerator=cpu",
            "--client-arg=--trainer.strategy.init_args.strategy=ddp",
            "--threads=1",
        ),
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out
    report = json.loads((workdir / "aggregator/fedavg/sim/aggregator/report.json").read_text())
    assert report["rounds_completed"] == 2
    for client in ("client-1", "client-2"):  # told once per party, not once per rank
        said = [line for line in out.splitlines() if line.startswith(f"[{client:10s}] ")]
        assert sum("federation finished" in line for line in said) == 1, out
    assert report["final_federated_metrics"], report
