"""The ``lightning-fed`` command: keys, task configurations, inspecting and cleaning storage.

Examples::

    lightning-fed keys new hospital-a --dir keys/
    lightning-fed keys task --task-id mnist-2026 keys/*.pub --out task.json
    lightning-fed keys federation --task-id demo --nodes agg c1 c2 --dir keys/
    lightning-fed check s3://bucket/federation --create-bucket
    lightning-fed inspect s3://bucket/federation --task-id mnist-2026
    lightning-fed clean s3://bucket/federation --task-id mnist-2026 --yes
    lightning-fed simulate --aggregator agg.yaml --client client.yaml --clients 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_fed import __version__
from lightning_fed.channel import (
    ChannelError,
    ConfigError,
    NodeIdentity,
    TaskConfig,
    check_storage,
    inspect_task,
    remove_task,
    validate_name,
)

if TYPE_CHECKING:
    from lightning_fed.simulate import SimulationResult


def _storage_options(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--storage-options must be a JSON object: {exc}") from exc
    if not isinstance(opts, dict):
        raise SystemExit("--storage-options must be a JSON object, e.g. '{\"anon\": false}'")
    return opts


def _keys_new(args: argparse.Namespace) -> int:
    private, public = NodeIdentity.generate(args.node_id).save(args.dir)
    print(f"wrote {private} (keep it secret) and {public} (share it)")
    return 0


def _keys_task(args: argparse.Namespace) -> int:
    cfg = TaskConfig.from_public_key_files(args.task_id, args.public_keys)
    if args.out:
        cfg.save(args.out)
        print(f"wrote {args.out} with nodes: {', '.join(cfg.node_ids)}")
    else:
        print(cfg.to_json())
    return 0


def _keys_federation(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    # Every id and file is checked before anything is written, so a corrected rerun
    # never meets half a federation's keys from a refused one.
    validate_name(args.task_id, "task id")
    for node_id in args.nodes:
        validate_name(node_id, "node id")
    twice = sorted({n for n in args.nodes if args.nodes.count(n) > 1})
    if twice:
        raise ConfigError(f"--nodes lists {', '.join(twice)} more than once; list each node once")
    present = [str(directory / f"{n}{suffix}") for n in args.nodes for suffix in (".key", ".pub")]
    present = [p for p in present if Path(p).exists()]
    if present:
        raise ConfigError(
            f"{', '.join(present)} exist already; keys are never overwritten; hint: choose "
            "another --dir, or delete them if you really mean to replace those identities"
        )
    publics = []
    for node_id in args.nodes:
        _, public = NodeIdentity.generate(node_id).save(directory)
        publics.append(public)
    out = directory / "task.json"
    TaskConfig.from_public_key_files(args.task_id, publics).save(out)  # type: ignore[arg-type]
    print(f"wrote keys of {', '.join(args.nodes)} and {out} into {directory}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    summary = inspect_task(args.url, args.task_id, _storage_options(args.storage_options))
    print("\n".join(summary.lines()))
    return 0


def _check(args: argparse.Namespace) -> int:
    options = _storage_options(args.storage_options)
    for line in check_storage(args.url, options, create_bucket=args.create_bucket):
        print(f"ok: {line}")
    print(f"{args.url} is ready for a federation")
    return 0


def _clean(args: argparse.Namespace) -> int:
    if not args.yes:
        print(
            f"this deletes every message and tensor of task {args.task_id!r} under {args.url}; "
            "run again with --yes to do it",
            file=sys.stderr,
        )
        return 2
    remove_task(args.url, args.task_id, _storage_options(args.storage_options))
    print(f"removed task {args.task_id!r} from {args.url}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from lightning_fed.simulate import describe, simulate

    workdir = args.workdir or f"runs/{args.task_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    fedavg = [args.aggregator, args.client, args.clients]
    if args.host or args.collaborator:
        if any(v is not None for v in fedavg) or not (args.host and args.collaborator):
            print(
                "simulate: a HeteroNN task takes --host and one --collaborator per "
                "collaborator, and none of --aggregator/--client/--clients",
                file=sys.stderr,
            )
            return 2
        return _simulate_hetero(args, workdir)
    if any(v is None for v in fedavg):
        print(
            "simulate: a FedAvg task takes --aggregator, --client and --clients "
            "(or, for HeteroNN, --host and --collaborator)",
            file=sys.stderr,
        )
        return 2
    print(f"simulate: {args.clients} client(s) and an aggregator in {workdir}", flush=True)
    return _finish(
        lambda: simulate(
            args.aggregator,
            args.client,
            clients=args.clients,
            workdir=workdir,
            task_id=args.task_id,
            aggregator_args=args.aggregator_arg,
            client_args=args.client_arg,
            threads=args.threads,
        ),
        lambda result: describe(result, args.task_id),
    )


def _finish(
    run: Callable[[], SimulationResult], describe: Callable[[SimulationResult], list[str]]
) -> int:
    """Run a simulation; print how it ended; the exit status (130 after Ctrl-C)."""
    try:
        result = run()
    except KeyboardInterrupt:
        print("simulate: stopped by Ctrl-C", file=sys.stderr)
        return 130
    print("\n".join(describe(result)))
    return 0 if result.ok else 1


def _simulate_hetero(args: argparse.Namespace, workdir: str) -> int:
    from lightning_fed.simulate import describe_hetero, simulate_hetero

    print(f"simulate: a host and {len(args.collaborator)} collaborator(s) in {workdir}", flush=True)
    return _finish(
        lambda: simulate_hetero(
            args.host,
            args.collaborator,
            workdir=workdir,
            task_id=args.task_id,
            host_args=args.host_arg,
            collaborator_args=args.collaborator_arg,
            threads=args.threads,
        ),
        lambda result: describe_hetero(result, args.task_id),
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-fed``."""
    parser = argparse.ArgumentParser(
        prog="lightning-fed", description="Federated learning for PyTorch Lightning."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="make node key pairs and task configurations")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="make one node's Ed25519 key pair")
    new.add_argument("node_id")
    new.add_argument("--dir", default=".", help="where to write NODE.key and NODE.pub")
    new.set_defaults(func=_keys_new)
    task = keys_sub.add_parser("task", help="make a task configuration from NODE.pub files")
    task.add_argument("--task-id", required=True)
    task.add_argument("public_keys", nargs="+", help="NODE.pub files (node id = file name)")
    task.add_argument("--out", help="write here instead of printing")
    task.set_defaults(func=_keys_task)
    fed = keys_sub.add_parser(
        "federation", help="make every node's keys and the task configuration (simulations)"
    )
    fed.add_argument("--task-id", required=True)
    fed.add_argument("--nodes", nargs="+", required=True)
    fed.add_argument("--dir", required=True)
    fed.set_defaults(func=_keys_federation)

    sim = sub.add_parser(
        "simulate", help="run a whole federation on this machine, one process per party"
    )
    sim.add_argument("--aggregator", help="FedAvg: the aggregator's LightningCLI YAML")
    sim.add_argument("--client", help="FedAvg: the clients' LightningCLI YAML")
    sim.add_argument("--clients", type=int, help="FedAvg: how many clients to start")
    sim.add_argument("--host", help="HeteroNN: the host's LightningCLI YAML")
    sim.add_argument(
        "--collaborator",
        action="append",
        default=[],
        metavar="YAML",
        help="HeteroNN: a collaborator's LightningCLI YAML (repeat for each collaborator)",
    )
    sim.add_argument("--task-id", default="simulation")
    sim.add_argument("--workdir", help="keys, channel and outputs (default: runs/TASK-TIME)")
    sim.add_argument(
        "--threads",
        type=int,
        help="PyTorch CPU threads per party (default: OMP_NUM_THREADS if set, else "
        "cores // parties, at least 1)",
    )
    sim.add_argument(
        "--aggregator-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra LightningCLI argument for the aggregator (repeatable)",
    )
    sim.add_argument(
        "--client-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra LightningCLI argument for every client (repeatable)",
    )
    for flag, who in (("--host-arg", "the host"), ("--collaborator-arg", "every collaborator")):
        sim.add_argument(
            flag,
            action="append",
            default=[],
            metavar="ARG",
            help=f"HeteroNN: extra LightningCLI argument for {who} (repeatable)",
        )
    sim.set_defaults(func=_simulate)

    check = sub.add_parser(
        "check",
        help="check that a channel URL works for a federation (reach, write, list, read, delete)",
    )
    check.add_argument("url", help="the channel URL (local path, file://, s3://...)")
    check.add_argument("--storage-options", help="fsspec options as a JSON object")
    check.add_argument(
        "--create-bucket",
        action="store_true",
        help="make the object store's bucket first if it does not exist",
    )
    check.set_defaults(func=_check)

    for name, func, text in (
        ("inspect", _inspect, "show unread messages and stored tensors of a task"),
        ("clean", _clean, "delete a task's whole storage"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("url", help="the channel URL (local path, file://, s3://...)")
        p.add_argument("--task-id", required=True)
        p.add_argument("--storage-options", help="fsspec options as a JSON object")
        if name == "clean":
            p.add_argument("--yes", action="store_true", help="really delete")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-fed`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ChannelError, OSError, ValueError, ImportError, FileExistsError) as exc:
        # Bad URLs, missing fsspec backends and unreadable files end in one clear line.
        print(f"lightning-fed: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
