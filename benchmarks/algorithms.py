"""Federated algorithms on non-IID MNIST, against FedAvg and centralised training.

    .venv/bin/python benchmarks/algorithms.py                      # everything (hours)
    .venv/bin/python benchmarks/algorithms.py --seeds 1 --alphas 0.1 --json out.json
    .venv/bin/python benchmarks/algorithms.py --only memory        # minutes

1. Accuracy. ``../shared/data/mnist``: 8,000 training images split among 10 clients by
   a Dirichlet(alpha) draw over labels (alpha 0.1 and 0.5), 2,000 held out on the
   aggregator; the seed's ConvNet (SGD lr 0.01, momentum 0.9, batch 128), 5 clients
   per round, 1 local epoch (``--local-epochs``), ``--rounds`` rounds, each algorithm
   (arguments as listed below, or ``--set LABEL.ARG=VALUE``) as a real federation of
   11 processes (``lightning-fed simulate``'s machinery), and centralised training
   of the same model on all 8,000 images for as many epochs as rounds, in the same
   script, per seed. Per algorithm and alpha: test accuracy (mean, min, max over
   seeds), gap to centralised, rounds to reach 95% of FedAvg's final accuracy (the
   aggregator validates on the holdout every round), per-round overhead (round wall
   time minus the slowest client's local fit) as a ratio to FedAvg's, and the
   aggregator's peak RSS.
2. Memory of robust aggregation: a fresh process holds a ~``--mb`` MB global model
   and folds 8 client updates of that size, one at a time as they would arrive, into
   each statistic; its peak RSS above the model-holding baseline is printed as a
   multiple of the model size, next to the baseline a framework that stacks every
   update in memory needs (Flower's FedMedian does: ``np.median`` over all updates).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples" / "mnist")]

#: (label, class path, init args)
ALGORITHMS: list[tuple[str, str, dict[str, Any]]] = [
    ("FedAvg", "lightning_fed.algorithms.FedAvg", {}),
    ("FedAvgM", "lightning_fed.algorithms.FedAvgM", {"lr": 0.1, "momentum": 0.9}),
    ("FedAdam", "lightning_fed.algorithms.FedAdam", {"lr": 0.01}),
    ("FedYogi", "lightning_fed.algorithms.FedYogi", {"lr": 0.01}),
    ("FedAdagrad", "lightning_fed.algorithms.FedAdagrad", {"lr": 0.01}),
    ("FedProx", "lightning_fed.algorithms.FedProx", {"mu": 0.01}),
    ("SCAFFOLD", "lightning_fed.algorithms.Scaffold", {}),  # control="gradients"
    ("Median", "lightning_fed.algorithms.Median", {}),
    ("TrimmedMean", "lightning_fed.algorithms.TrimmedMean", {"beta": 0.2}),
    ("Krum", "lightning_fed.algorithms.Krum", {"byzantine": 1, "select": 3}),
]
ROBUST = {"Median", "TrimmedMean", "Krum"}
CLIENTS, PER_ROUND = 10, 5


def _algorithm_args(path: str, init: dict[str, Any]) -> list[str]:
    prefix = "--trainer.strategy.init_args.algorithm"
    return [f"{prefix}.class_path={path}"] + [
        f"{prefix}.init_args.{k}={v}" for k, v in init.items()
    ]


def _overheads(report: dict[str, Any]) -> list[float]:
    """Per round: round wall time minus the slowest client's local fit time (seconds)."""
    out = []
    for r in report["rounds"]:
        fits = [m.get("fit_seconds", 0.0) for m in r["client_metrics"].values()]
        out.append(r["seconds"] - max(fits, default=0.0))
    return out


def _parse_sets(sets: list[str]) -> dict[str, dict[str, Any]]:
    """``["FedProx.mu=0.1", ...]`` -> ``{"FedProx": {"mu": 0.1}}`` (values as JSON, else text)."""
    out: dict[str, dict[str, Any]] = {}
    for item in sets:
        target, sep, raw = item.partition("=")
        label, dot, key = target.partition(".")
        if not (sep and dot and label and key):
            raise SystemExit(f"--set {item!r}: expected LABEL.ARG=VALUE, e.g. FedProx.mu=0.1")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(label, {})[key] = value
    return out


def federation(
    work: Path,
    label: str,
    path: str,
    init: dict[str, Any],
    alpha: float,
    seed: int,
    rounds: int,
    local_epochs: int = 1,
) -> dict[str, Any]:
    """One federation; returns its report, or ``{"failed": reason}`` if it failed.

    A finished federation's report in ``work`` is reused, so a rerun with the same
    ``--workdir`` carries on where an interrupted one stopped.
    """
    from lightning_fed.simulate import simulate

    ex = ROOT / "examples" / "mnist"
    settings = "".join(f"-{k}{v}" for k, v in sorted(init.items()))
    epochs = "" if local_epochs == 1 else f"-e{local_epochs}"
    name = f"{label}{settings}{epochs}-a{alpha}-s{seed}"
    done = work / name / "aggregator" / "fedavg" / "mnist" / "aggregator" / "report.json"
    if done.is_file():
        report = json.loads(done.read_text())
        if report.get("rounds_completed") == rounds and report.get("test_metrics"):
            return dict(report)
    with open(work / f"{name}.log", "w") as log:
        result = simulate(
            ex / "aggregator.yaml",
            ex / "client.yaml",
            clients=CLIENTS,
            workdir=work / name,
            task_id="mnist",
            aggregator_args=[
                f"--seed_everything={seed}",
                f"--trainer.strategy.init_args.rounds={rounds}",
                f"--trainer.strategy.init_args.clients_per_round={PER_ROUND}",
                f"--trainer.strategy.init_args.min_clients={PER_ROUND}",
                f"--trainer.strategy.init_args.seed={seed}",
                "--trainer.strategy.init_args.calculation_timeout=600",
                "--trainer.strategy.init_args.schedule_timeout=600",
                f"--data.init_args.num_clients={CLIENTS}",
                f"--trainer.strategy.init_args.local_epochs={local_epochs}",
                *_algorithm_args(path, init),
            ],
            client_args=[
                f"--seed_everything={seed}",
                f"--data.init_args.dirichlet_alpha={alpha}",
                f"--data.init_args.seed={seed}",
                "--trainer.strategy.init_args.calculation_timeout=600",
                "--trainer.strategy.init_args.schedule_timeout=600",
            ],
            out=log,
            threads=1,
        )
    if not (result.ok and result.report):
        errors = [
            line.split("error: ", 1)[1]
            for line in (work / f"{name}.log").read_text().splitlines()
            if "[aggregator] lightning-fed party aggregator: error: " in line
        ]
        return {"failed": (errors or ["see " + str(work / f"{name}.log")])[0][:300]}
    return dict(result.report)


def centralised(seed: int, epochs: int) -> float:
    """The same ConvNet on all 8,000 training images for ``epochs`` epochs."""
    import lightning.pytorch as L
    from mnist import ConvNet, MnistData

    warnings.filterwarnings("ignore")
    L.seed_everything(seed, verbose=False)
    data = MnistData(client_index=None, num_clients=CLIENTS, seed=seed)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    model = ConvNet()
    trainer.fit(model, datamodule=data)
    return float(trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"])


def _curve(report: dict[str, Any]) -> list[float]:
    return [float(r.get("metrics", {}).get("val_acc", float("nan"))) for r in report["rounds"]]


def _rounds_to(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, acc in enumerate(curve) if acc >= target), None)


def accuracy(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    overrides = _parse_sets(args.set)
    unknown = set(overrides) - {a[0] for a in ALGORITHMS}
    if unknown:
        raise SystemExit(f"--set names unknown algorithm(s) {sorted(unknown)}")
    chosen = [
        (label, path, {**init, **overrides.get(label, {})})
        for label, path, init in ALGORITHMS
        if not args.algorithms or label in args.algorithms
    ]
    if chosen[0][0] != "FedAvg":
        chosen.insert(0, ALGORITHMS[0])  # every figure is relative to FedAvg
    central = []
    for seed in range(args.seeds):
        central.append(centralised(seed, args.rounds))
        print(
            f"centralised seed {seed}: {args.rounds} epochs test_acc {central[-1]:.4f}", flush=True
        )
    central_mean = statistics.fmean(central)
    rows: list[dict[str, Any]] = []
    for alpha in args.alphas:
        runs: dict[str, list[dict[str, Any]]] = {}
        init_of = {label: init for label, _, init in chosen}
        for label, path, init in chosen:
            for seed in range(args.seeds):
                started = time.monotonic()
                report = federation(
                    work, label, path, init, alpha, seed, args.rounds, args.local_epochs
                )
                runs.setdefault(label, []).append(report)
                took = time.monotonic() - started
                if "failed" in report:
                    print(f"alpha {alpha} {label:11s} seed {seed}: FAILED: {report['failed']}")
                    continue
                acc = report["test_metrics"]["test_acc"]
                print(f"alpha {alpha} {label:11s} seed {seed}: test_acc {acc:.4f} ({took:.0f} s)")
        fedavg = [r for r in runs["FedAvg"] if "failed" not in r]
        fedavg_final = statistics.fmean(r["test_metrics"]["test_acc"] for r in fedavg)
        fedavg_overhead = statistics.median(o for r in fedavg for o in _overheads(r))
        for label, all_reports in runs.items():
            reports = [r for r in all_reports if "failed" not in r]
            failed = [r["failed"] for r in all_reports if "failed" in r]
            if not reports:
                rows.append({"algorithm": label, "alpha": alpha, "seeds": 0, "failed": failed})
                continue
            accs = [r["test_metrics"]["test_acc"] for r in reports]
            to_target = [_rounds_to(_curve(r), 0.95 * fedavg_final) for r in reports]
            overhead = statistics.median(o for r in reports for o in _overheads(r))
            rows.append(
                {
                    "algorithm": label,
                    "args": init_of[label],
                    "alpha": alpha,
                    "seeds": len(reports),
                    "failed": failed,
                    "accuracy_mean": statistics.fmean(accs),
                    "accuracy_min": min(accs),
                    "accuracy_max": max(accs),
                    "gap_to_centralised_pp": 100 * (statistics.fmean(accs) - central_mean),
                    "gap_to_fedavg_pp": 100 * (statistics.fmean(accs) - fedavg_final),
                    "rounds_to_95pct_of_fedavg": to_target,
                    "overhead_ms": 1000 * overhead,
                    "overhead_vs_fedavg": overhead / fedavg_overhead if fedavg_overhead else None,
                    "aggregator_peak_rss_mb": max((r.get("peak_rss_bytes") or 0) for r in reports)
                    / 2**20,
                }
            )
    print(f"\ncentralised ({args.seeds} seeds, {args.rounds} epochs): {central_mean:.4f}")
    print(
        f"{'algorithm':11s} {'alpha':>5s} {'acc mean':>8s} {'min':>6s} {'max':>6s} "
        f"{'vs central':>10s} {'vs FedAvg':>9s} {'rounds to 95%':>14s} "
        f"{'overhead':>9s} {'x FedAvg':>8s} {'agg RSS':>8s}"
    )
    for r in rows:
        if not r["seeds"]:
            print(f"{r['algorithm']:11s} {r['alpha']:5.1f} every seed FAILED: {r['failed'][0]}")
            continue
        reach = ",".join("-" if v is None else str(v) for v in r["rounds_to_95pct_of_fedavg"])
        ratio = "-" if r["overhead_vs_fedavg"] is None else f"{r['overhead_vs_fedavg']:.2f}"
        print(
            f"{r['algorithm']:11s} {r['alpha']:5.1f} {r['accuracy_mean']:8.4f} "
            f"{r['accuracy_min']:6.4f} {r['accuracy_max']:6.4f} "
            f"{r['gap_to_centralised_pp']:+9.2f}pp {r['gap_to_fedavg_pp']:+8.2f}pp "
            f"{reach:>14s} {r['overhead_ms']:7.0f}ms {ratio:>8s} "
            f"{r['aggregator_peak_rss_mb']:6.0f}MB"
            + (f"  ({len(r['failed'])} seed(s) FAILED)" if r["failed"] else ""),
            flush=True,
        )
    print(
        f"local epochs per round: {args.local_epochs}; arguments: "
        + "; ".join(
            f"{label} " + (", ".join(f"{k}={v}" for k, v in init.items()) or "defaults")
            for label, _, init in chosen
        )
    )
    for alpha in args.alphas:
        better = [
            r["algorithm"]
            for r in rows
            if r["alpha"] == alpha
            and r["algorithm"] in ("FedProx", "SCAFFOLD", "FedAdam")
            and r["seeds"]
            and r["gap_to_fedavg_pp"] >= 2
        ]
        print(
            f"alpha {alpha}: FedProx/SCAFFOLD/FedAdam beating FedAvg by >= 2 pp: "
            f"{', '.join(better) or 'none'}"
        )
    return rows


# -- memory of robust statistics ------------------------------------------------------
def _vm(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")


def _memory_child(kind: str, mb: int, clients: int, queue: Any) -> None:
    import torch

    from lightning_fed.algorithms import ClientUpdate, FedAvg, Krum, Median, TrimmedMean

    numel = mb * 2**20 // 4
    shapes = {f"layer{i}.weight": (numel // 8,) for i in range(8)}
    global_model = {k: torch.randn(s) for k, s in shapes.items()}  # what the aggregator holds
    _reset_peak()
    base = _vm("VmRSS")
    started = time.monotonic()
    if kind == "stacked median":  # every update in memory, then one median
        updates = [{k: v + 0.01 * c for k, v in global_model.items()} for c in range(clients)]
        result = {k: torch.stack([u[k] for u in updates]).median(dim=0).values for k in shapes}
        del updates
    else:
        algorithm = {
            "FedAvg": FedAvg(),
            "Median": Median(),
            "TrimmedMean": TrimmedMean(beta=0.2),
            "Krum": Krum(byzantine=1, select=3),
        }[kind]
        stat = algorithm.statistic()
        for c in range(clients):  # one received update at a time, dropped after folding
            update = {k: v + 0.01 * c for k, v in global_model.items()}
            stat.add(ClientUpdate(f"c{c}", update, 100))
            del update
        result = stat.result().mean
    seconds = time.monotonic() - started
    peak = _vm("VmHWM") - base
    del result
    queue.put((peak, seconds))


def memory(mb: int, clients: int = 8) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    model_bytes = mb * 2**20
    rows = []
    for kind in ("FedAvg", "Median", "TrimmedMean", "Krum", "stacked median"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_memory_child, args=(kind, mb, clients, queue))
        proc.start()
        peak, seconds = queue.get(timeout=1800)
        proc.join()
        rows.append(
            {
                "statistic": kind,
                "clients": clients,
                "model_mb": mb,
                "peak_above_model_mb": peak / 2**20,
                "x_model": peak / model_bytes,
                "seconds": seconds,
            }
        )
        print(
            f"{kind:15s} {clients} clients x {mb} MB: peak RSS above the held global model "
            f"{peak / 2**20:6.0f} MB = {peak / model_bytes:4.2f}x the model; with it "
            f"{1 + peak / model_bytes:4.2f}x; {seconds:5.1f} s",
            flush=True,
        )
    median = next(r for r in rows if r["statistic"] == "Median")
    stacked = next(r for r in rows if r["statistic"] == "stacked median")
    total = 1 + median["x_model"]
    print(
        f"median of {clients} x {mb} MB: the aggregator holds {total:.2f}x the model at its "
        f"peak (the global model plus {median['x_model']:.2f}x; target within 3x: "
        f"{'met' if total <= 3 else 'NOT met'}), against {1 + stacked['x_model']:.2f}x when "
        "every update is held in memory",
        flush=True,
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--algorithms", nargs="*", help="labels to run (FedAvg always runs)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="LABEL.ARG=VALUE",
        help="override an algorithm's argument, e.g. --set FedProx.mu=0.1 (repeatable)",
    )
    parser.add_argument("--local-epochs", type=int, default=1, help="client epochs per round")
    parser.add_argument("--mb", type=int, default=100, help="model size of the memory part")
    parser.add_argument("--only", choices=["accuracy", "memory"])
    parser.add_argument("--json", type=Path, help="also write the tables here")
    parser.add_argument("--workdir", type=Path, help="keep the federations' folders here")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    out: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    if args.only != "accuracy":
        out["memory"] = memory(args.mb)
    if args.only != "memory":
        with tempfile.TemporaryDirectory(prefix="bench-algorithms-") as tmp:
            work = args.workdir or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            out["accuracy"] = accuracy(args, work)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"tables written to {args.json}")


if __name__ == "__main__":
    main()
