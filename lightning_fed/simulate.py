"""``lightning-fed simulate``: a whole federation on one machine, one process per party.

It makes a work folder with every node's keys and a local-directory channel, then
starts the aggregator and N clients from their LightningCLI YAML configs
(``python -m lightning_fed.party``), each a fresh Python process. Every line a party
prints is prefixed with its node id. A simulation is a rehearsal: the first party
that fails stops every other one at once, and its error is repeated at the end.
Ctrl-C or SIGTERM stops every party too; the exit status is non-zero when any party
failed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lightning_fed.channel import NodeIdentity, TaskConfig, validate_name

AGGREGATOR = "aggregator"
STOP_GRACE = 15.0  # seconds a party gets to stop after Ctrl-C before it is killed
TAIL_LINES = 40  # lines of each party's output kept to name its error
#: What ``simulate`` passes to every client's datamodule (``--data.init_args.NAME``).
CLIENT_DATA_ARGUMENTS = ("client_index", "num_clients")


def client_id(index: int) -> str:
    """The node id of the ``index``-th simulated client (0-based): ``client-1``, ..."""
    return f"client-{index + 1}"


@dataclass
class Party:
    """One running party: its node id, command and process."""

    node_id: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    pump: threading.Thread | None = field(default=None, repr=False)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES), repr=False)

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def error(self) -> str:
        """The party's own error, from the end of what it printed."""
        lines = [line for line in self.tail if line.strip()]
        raised = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
        said = [i for i, line in enumerate(lines) if _ERROR_WORD.search(line)]
        if raised and (not said or raised[-1] >= said[-1]):
            return lines[raised[-1]].strip()  # a traceback's last line
        if said:
            return "\n".join(lines[said[-1] :][:8]).strip()
        return "\n".join(lines[-5:]).strip() or "(it printed nothing)"


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")
_ERROR_WORD = re.compile(r"\berror\b", re.IGNORECASE)


@dataclass(frozen=True)
class SimulationResult:
    """Where a finished simulation left its outputs, and how each party ended."""

    workdir: Path
    returncodes: dict[str, int]
    report: dict[str, Any] | None
    #: The first party that failed and its error, or None when none failed.
    first_failure: tuple[str, str] | None = None

    @property
    def ok(self) -> bool:
        return all(code == 0 for code in self.returncodes.values())

    @property
    def aggregator_dir(self) -> Path:
        return self.workdir / AGGREGATOR


def make_keys(workdir: Path, task_id: str, nodes: Sequence[str]) -> Path:
    """Write every node's key pair and ``task.json`` under ``workdir/keys``."""
    keys = workdir / "keys"
    publics = []
    for node in nodes:
        _, public = NodeIdentity.generate(node).save(keys)
        publics.append(public)
    TaskConfig.from_public_key_files(task_id, list(publics)).save(keys / "task.json")
    return keys


def party_command(
    config: Path, node_id: str, role: str, workdir: Path, task_id: str, extra: Sequence[str]
) -> list[str]:
    """The command line of one party: its config plus the simulation's overrides."""
    s = "--trainer.strategy.init_args."
    return [
        sys.executable,
        "-m",
        "lightning_fed.party",
        "--config",
        str(config),
        f"{s}channel={workdir / 'channel'}",
        f"{s}task_id={task_id}",
        f"{s}node_id={node_id}",
        f"{s}role={role}",
        f"{s}keys={workdir / 'keys'}",
        f"--trainer.default_root_dir={workdir / node_id}",
        *extra,
    ]


def _pump(
    stream: IO[bytes], prefix: str, out: IO[str], lock: threading.Lock, tail: deque[str]
) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        for part in line.split("\r"):  # progress bars redraw with \r: one line each
            if part.strip():
                tail.append(part)
                with lock:
                    out.write(f"{prefix}{part}\n")
                    out.flush()
    stream.close()


def threads_per_party(parties: int) -> int:
    """CPU threads for each party's PyTorch, so that the parties share the cores.

    ``max(1, cores // parties)``: without a limit every process would start one
    thread per core, and N parties on C cores would oversubscribe them N times.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, parties))


def _environment(configs: Sequence[Path], threads: int | None, parties: int) -> dict[str, str]:
    env = dict(os.environ)
    # PyTorch's intra-op threads: an explicit value, else the user's environment, else a share.
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.setdefault("OMP_NUM_THREADS", str(threads_per_party(parties)))
    # The configs' folders go on the path, so class_path: digits.DigitsCNN resolves.
    paths = [str(p.parent.resolve()) for p in configs]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def simulate(
    aggregator_config: str | os.PathLike[str],
    client_config: str | os.PathLike[str],
    *,
    clients: int,
    workdir: str | os.PathLike[str],
    task_id: str = "simulation",
    aggregator_args: Sequence[str] = (),
    client_args: Sequence[str] = (),
    out: IO[str] | None = None,
    threads: int | None = None,
) -> SimulationResult:
    """Run a whole federation as separate processes and wait for every party.

    Args:
        aggregator_config: LightningCLI YAML of the aggregator.
        client_config: LightningCLI YAML of the clients; client ``i`` (0-based) also
            gets ``--data.init_args.client_index=i`` and ``num_clients``.
        clients: how many clients to start.
        workdir: the simulation's folder (keys, channel, one folder per party).
        task_id: the federation's id.
        aggregator_args: extra LightningCLI arguments for the aggregator.
        client_args: extra LightningCLI arguments for every client.
        out: where the parties' prefixed lines go (default: stdout).
        threads: PyTorch CPU threads per party (default: ``OMP_NUM_THREADS`` if set,
            else :func:`threads_per_party`).
    """
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients must be an int >= 1, got {clients!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    agg_cfg, cli_cfg = Path(aggregator_config), Path(client_config)
    out = out or sys.stdout
    nodes = [AGGREGATOR] + [client_id(i) for i in range(clients)]
    root = _prepare(workdir, task_id, nodes, [agg_cfg, cli_cfg])
    parties = [
        Party(
            AGGREGATOR,
            party_command(
                agg_cfg,
                AGGREGATOR,
                "aggregator",
                root,
                task_id,
                [f"--trainer.strategy.init_args.clients={clients}", *aggregator_args],
            ),
        )
    ]
    for i in range(clients):
        extra = [
            f"--data.init_args.client_index={i}",
            f"--data.init_args.num_clients={clients}",
            *client_args,
        ]
        parties.append(
            Party(
                client_id(i), party_command(cli_cfg, client_id(i), "client", root, task_id, extra)
            )
        )
    codes, interrupted, failure = _run_parties(parties, [agg_cfg, cli_cfg], threads, out)
    report_path = root / AGGREGATOR / "fedavg" / task_id / AGGREGATOR / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    if interrupted:
        raise KeyboardInterrupt
    return SimulationResult(root, codes, report, failure)


def _prepare(
    workdir: str | os.PathLike[str], task_id: str, nodes: Sequence[str], configs: Sequence[Path]
) -> Path:
    """Check the configs and the work folder, write the keys, make the channel folder."""
    validate_name(task_id, "task id")
    for node in nodes:
        validate_name(node, "node id")
    for path in configs:
        if not path.is_file():
            raise FileNotFoundError(f"no LightningCLI config at {str(path)!r}")
    root = Path(workdir).resolve()
    if (root / "channel" / task_id).exists() or (root / nodes[0]).exists():
        raise FileExistsError(
            f"{str(root)!r} holds an earlier simulation of task {task_id!r}; hint: choose "
            "another --workdir or delete it"
        )
    make_keys(root, task_id, nodes)
    (root / "channel").mkdir(parents=True, exist_ok=True)
    return root


HOST = "host"


def collaborator_id(index: int) -> str:
    """The node id of the ``index``-th simulated collaborator (0-based): ``collaborator-1``."""
    return f"collaborator-{index + 1}"


def simulate_hetero(
    host_config: str | os.PathLike[str],
    collaborator_configs: Sequence[str | os.PathLike[str]],
    *,
    workdir: str | os.PathLike[str],
    task_id: str = "simulation",
    host_args: Sequence[str] = (),
    collaborator_args: Sequence[str] = (),
    out: IO[str] | None = None,
    threads: int | None = None,
) -> SimulationResult:
    """Run a HeteroNN task, a host and one collaborator per config, as separate processes.

    Every party runs ``fit`` then ``test`` (``python -m lightning_fed.party``). The
    host is ``host``; collaborator ``i`` (0-based) is ``collaborator-{i+1}``, and its
    config is ``collaborator_configs[i]`` (each collaborator holds its own columns).
    """
    if not collaborator_configs:
        raise ValueError("a HeteroNN task needs at least one collaborator config")
    host_cfg = Path(host_config)
    cfgs = [Path(c) for c in collaborator_configs]
    out = out or sys.stdout
    collaborators = [collaborator_id(i) for i in range(len(cfgs))]
    root = _prepare(workdir, task_id, [HOST, *collaborators], [host_cfg, *cfgs])
    listed = "[" + ",".join(collaborators) + "]"
    parties = [
        Party(
            HOST,
            party_command(
                host_cfg,
                HOST,
                "host",
                root,
                task_id,
                [f"--trainer.strategy.init_args.collaborators={listed}", *host_args],
            ),
        )
    ]
    for node, cfg in zip(collaborators, cfgs):
        extra = [f"--trainer.strategy.init_args.host={HOST}", *collaborator_args]
        parties.append(Party(node, party_command(cfg, node, "collaborator", root, task_id, extra)))
    codes, interrupted, failure = _run_parties(parties, [host_cfg, *cfgs], threads, out)
    if interrupted:
        raise KeyboardInterrupt
    from lightning_fed.node.party import party_dir  # torch only once parties ran

    report_path = party_dir(root / HOST, "heteronn", task_id, HOST) / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return SimulationResult(root, codes, report, failure)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the simulation as Ctrl-C does (in the main thread; else unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_parties(
    parties: Sequence[Party], configs: Sequence[Path], threads: int | None, out: IO[str]
) -> tuple[dict[str, int], bool, tuple[str, str] | None]:
    """Start every party, prefix its lines, wait; the first failure stops every party.

    Returns:
        Each party's exit status, whether Ctrl-C/SIGTERM stopped the simulation, and
        the first party that failed with its error.
    """
    env = _environment(configs, threads, len(parties))
    width = max(len(p.node_id) for p in parties)
    lock = threading.Lock()
    interrupted = False
    failure: Party | None = None
    with _sigterm_as_interrupt():
        try:
            for party in parties:
                party.process = subprocess.Popen(
                    party.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
                )
                assert party.process.stdout is not None
                party.pump = threading.Thread(
                    target=_pump,
                    args=(
                        party.process.stdout,
                        f"[{party.node_id:<{width}}] ",
                        out,
                        lock,
                        party.tail,
                    ),
                    daemon=True,
                )
                party.pump.start()
            failure = _wait_all(parties, out)
        except KeyboardInterrupt:
            interrupted = True
            out.write("simulate: interrupted (Ctrl-C or SIGTERM), stopping every party\n")
            out.flush()
            _stop_all(parties)
    for party in parties:
        if party.pump is not None:
            party.pump.join(timeout=5)
    codes = {p.node_id: (p.returncode if p.returncode is not None else -1) for p in parties}
    return codes, interrupted, None if failure is None else (failure.node_id, failure.error())


def _wait_all(parties: Sequence[Party], out: IO[str]) -> Party | None:
    """Wait for every party; the first that fails stops the others at once.

    Returns:
        The first party that exited with a non-zero status, if any.
    """
    while True:
        running = False
        for party in parties:
            assert party.process is not None
            code = party.process.poll()
            if code is None:
                running = True
            elif code != 0:
                if any(p.process is not None and p.process.poll() is None for p in parties):
                    out.write(
                        f"simulate: {party.node_id} failed (exit {code}); stopping every "
                        "other party\n"
                    )
                    out.flush()
                    _stop_all(parties)
                return party
        if not running:
            return None
        time.sleep(0.2)


def _stop_all(parties: Sequence[Party]) -> None:
    """Interrupt every party, give it ``STOP_GRACE`` seconds, then kill it."""
    for party in parties:
        if party.process is not None and party.process.poll() is None:
            party.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE
    for party in parties:
        if party.process is None:
            continue
        try:
            party.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            party.process.kill()
            party.process.wait()


def _status_lines(result: SimulationResult) -> list[str]:
    lines = [
        f"  {n}: {'ok' if c == 0 else f'FAILED (exit {c})'}" for n, c in result.returncodes.items()
    ]
    if result.first_failure is not None:
        node, error = result.first_failure
        lines.append(f"first failure: {node}: {error}")
        if node != AGGREGATOR and node != HOST and any(a in error for a in CLIENT_DATA_ARGUMENTS):
            lines.append(
                "hint: simulate passes --data.init_args.client_index=I and num_clients=N to "
                "every client: give the client's datamodule these two __init__ arguments "
                "(see docs/fedavg.md, 'Simulating your own configs')"
            )
    return lines


def _existing(label: str, path: Path, extra: str = "") -> list[str]:
    return [f"  {label:<13} {path}{extra}"] if path.exists() else []


def describe(result: SimulationResult, task_id: str) -> list[str]:
    """Human lines saying how the simulation ended and where its outputs are."""
    lines = _status_lines(result)
    agg = result.aggregator_dir
    out = agg / "fedavg" / task_id / AGGREGATOR
    found = [
        *_existing("final model:", out / "final.safetensors", " (and final.ckpt)"),
        *_existing("report:", out / "report.json"),
    ]
    if (agg / "lightning_logs").is_dir():
        found.append(f"  {'TensorBoard:':<13} tensorboard --logdir {agg / 'lightning_logs'}")
    lines += [f"outputs under {result.workdir}:", *found] if found else ["no outputs were written"]
    if result.report:
        final = result.report.get("test_metrics") or result.report.get("final_metrics") or {}
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items()))
        lines.insert(
            0,
            f"{result.report.get('rounds_completed')} rounds completed; final: {shown or '-'}",
        )
    return lines


def describe_hetero(result: SimulationResult, task_id: str) -> list[str]:
    """Human lines saying how a HeteroNN simulation ended and where its outputs are."""
    lines = _status_lines(result)
    host = result.workdir / HOST
    found = [
        line
        for node in result.returncodes
        for line in _existing(
            "report:", result.workdir / node / "heteronn" / task_id / node / "report.json"
        )
    ]
    if (host / "lightning_logs").is_dir():
        found.append(f"  {'TensorBoard:':<13} tensorboard --logdir {host / 'lightning_logs'}")
    lines += [f"outputs under {result.workdir}:", *found] if found else ["no outputs were written"]
    if result.report:
        epochs = result.report.get("epochs") or []
        test = result.report.get("test_metrics") or {}
        shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(test.items()))
        per_batch = [e["train_seconds"] / e["batches"] for e in epochs if e.get("batches")]
        lines.insert(
            0,
            f"{len(epochs)} epochs on {result.report.get('common_ids')} common IDs "
            f"(intersection in {result.report.get('psi_seconds', 0):.2f} s); test: {shown or '-'}"
            + (f"; {1000 * min(per_batch):.1f} ms per training batch" if per_batch else ""),
        )
    return lines
