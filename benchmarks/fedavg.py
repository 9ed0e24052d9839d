"""FedAvg figures: accuracy against centralised training, framework overhead, peak RSS.

    .venv/bin/python benchmarks/fedavg.py              # everything (several minutes)
    .venv/bin/python benchmarks/fedavg.py --only accuracy

1. Accuracy: the digits (3 clients, 10 rounds) and MNIST (2 clients, 5 rounds)
   federations run with ``lightning-fed simulate``'s machinery, next to plain
   Lightning training of the same model on the union of the clients' data for the
   same number of epochs, tested on the same holdout; each with ``--seeds``
   training seeds (the data split stays fixed), compared by their means.
2. Overhead per round on ``file://``: the aggregator's round wall time minus the
   slowest client's local fit time (each client reports ``fit_seconds``), for the
   seed's ConvNet (MNIST run) and a ~100 MB model (8 clients).
3. The aggregator's peak RSS with 8 clients and the ~100 MB model, above its RSS
   before round 1 (model loaded), as a multiple of the model size; total RSS too.
   Sampled every 2 ms from /proc (Linux).
4. DDP inside a client (``--only ddp``): the MNIST federation with one client, in one
   process and on 2 DDP ranks (CPU, gloo), next to plain Lightning training of the same
   model on the same data for as many epochs, in one process and with DDP on 2 ranks.
   Per round (median over rounds 2..R): the federation's round time, plain Lightning's
   epoch time, and the framework's overhead (round minus epoch) with and without DDP;
   what DDP adds to that overhead is printed as a share of the DDP round (target under
   10%). On 2 cores DDP cannot be faster than one process; the figure is the
   framework's cost on top of Lightning's own DDP.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [
    str(ROOT / "benchmarks"),
    str(ROOT / "examples" / "digits"),
    str(ROOT / "examples" / "mnist"),
]


def _plain_accuracy(model: Any, data: Any, epochs: int, seed: int) -> float:
    import lightning.pytorch as L

    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    return float(trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"])


def _overhead(report: dict[str, Any]) -> list[float]:
    """Per round: round wall time minus the slowest client's fit time (seconds)."""
    out = []
    for r in report["rounds"]:
        fits = [m.get("fit_seconds", 0.0) for m in r["client_metrics"].values()]
        out.append(r["seconds"] - max(fits))
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def accuracy(work: Path, seeds: int, mnist_rounds: int = 5, only: str | None = None) -> None:
    import torch
    from digits import DigitsCNN, DigitsData
    from mnist import ConvNet, MnistData

    from lightning_fed.simulate import simulate

    torch.set_num_threads(1)  # like each party of the 3-4 process simulations on 2 cores
    overheads: list[float] = []
    for name, clients, rounds, model, data in (
        ("digits", 3, 10, DigitsCNN, DigitsData),
        ("mnist", 2, mnist_rounds, ConvNet, MnistData),
    ):
        if only is not None and name != only:
            continue
        ex = ROOT / "examples" / name
        feds, centrals = [], []
        for seed in range(seeds):
            with open(work / f"{name}-{seed}.log", "w") as log:
                res = simulate(
                    ex / "aggregator.yaml",
                    ex / "client.yaml",
                    clients=clients,
                    workdir=work / f"{name}-{seed}",
                    task_id=name,
                    aggregator_args=[
                        f"--seed_everything={seed}",
                        f"--trainer.strategy.init_args.rounds={rounds}",
                    ],
                    client_args=[f"--seed_everything={seed}"],
                    out=log,
                )
            assert res.ok and res.report, f"{name} federation failed, see {log.name}"
            feds.append(res.report["test_metrics"]["test_acc"])
            central_data = data(client_index=None, num_clients=clients)
            centrals.append(_plain_accuracy(model(), central_data, rounds, seed))
            if name == "mnist":
                overheads += _overhead(res.report)
            print(
                f"{name:7s} seed {seed}: FedAvg {clients} clients x {rounds} rounds "
                f"test_acc {feds[-1]:.4f} | centralised {rounds} epochs {centrals[-1]:.4f}",
                flush=True,
            )
        diff = 100 * (_mean(feds) - _mean(centrals))
        print(
            f"{name:7s} mean of {seeds} seed(s): FedAvg {_mean(feds):.4f} | centralised "
            f"{_mean(centrals):.4f} | difference {diff:+.2f} pp (target within 1 pp: "
            f"{'met' if abs(diff) <= 1 else 'NOT met'})",
            flush=True,
        )
    if not overheads:
        return
    print(
        f"overhead per round, seed ConvNet on file:// ({len(overheads)} rounds): median "
        f"{1000 * statistics.median(overheads):.0f} ms, max {1000 * max(overheads):.0f} ms "
        "(target <= 100 ms)",
        flush=True,
    )


# -- DDP inside a client ------------------------------------------------------------
def _plain_epochs(out: str, devices: int, epochs: int) -> None:
    """Plain Lightning on client 0's MNIST share (1 client), epoch times to ``out``.

    Run as ``fedavg.py --plain-epochs OUT DEVICES EPOCHS``: under DDP Lightning starts
    the second rank by running that command again.
    """
    import json

    import lightning.pytorch as L
    from mnist import ConvNet, MnistData

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            self.times.append(time.perf_counter() - self.started)

    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    clock = Clock()
    ddp = {"strategy": "ddp", "devices": devices} if devices > 1 else {"devices": 1}
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[clock],
        **ddp,  # type: ignore[arg-type]
    )
    trainer.fit(ConvNet(), datamodule=MnistData(client_index=0, num_clients=1))
    if trainer.global_rank == 0:
        Path(out).write_text(json.dumps(clock.times))


def _median_after_first(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def ddp_client(work: Path, rounds: int) -> None:
    import json
    import subprocess

    from lightning_fed.simulate import simulate

    ex = ROOT / "examples" / "mnist"
    rows = {}
    for devices in (1, 2):
        plain = work / f"plain-{devices}.json"
        subprocess.run(
            [sys.executable, __file__, "--plain-epochs", str(plain), str(devices), str(rounds)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        epoch = _median_after_first(json.loads(plain.read_text()))
        ddp = (
            [
                f"--trainer.devices={devices}",
                "--trainer.accelerator=cpu",
                "--trainer.strategy.init_args.strategy=ddp",
            ]
            if devices > 1
            else []
        )
        with open(work / f"ddp-{devices}.log", "w") as log:
            res = simulate(
                ex / "aggregator.yaml",
                ex / "client.yaml",
                clients=1,
                workdir=work / f"ddp-{devices}",
                task_id="mnist",
                aggregator_args=[
                    f"--trainer.strategy.init_args.rounds={rounds}",
                    "--trainer.strategy.init_args.min_clients=1",
                    "--data.init_args.num_clients=1",
                ],
                client_args=["--data.init_args.num_clients=1", *ddp],
                out=log,
                threads=1 if devices > 1 else 2,
            )
        assert res.ok and res.report, f"the federation failed, see {log.name}"
        round_time = _median_after_first([r["seconds"] for r in res.report["rounds"]])
        rows[devices] = (round_time, epoch)
        label = "one process" if devices == 1 else f"{devices} DDP ranks"
        print(
            f"MNIST, 1 client, {label:11s}: federated round {1000 * round_time:6.0f} ms | plain "
            f"Lightning epoch {1000 * epoch:6.0f} ms | framework overhead "
            f"{1000 * (round_time - epoch):5.0f} ms",
            flush=True,
        )
    (one_round, one_epoch), (ddp_round, ddp_epoch) = rows[1], rows[2]
    added = (ddp_round - ddp_epoch) - (one_round - one_epoch)
    share = added / ddp_round
    print(
        f"DDP's own cost (plain Lightning, 2 ranks vs 1 process): x{ddp_epoch / one_epoch:.2f} "
        f"per epoch; what the framework adds under DDP beyond its one-process overhead: "
        f"{1000 * added:+.0f} ms = {100 * share:+.1f}% of the DDP round (target under 10%: "
        f"{'met' if share < 0.10 else 'NOT met'})",
        flush=True,
    )


def _rss() -> int:
    """This process's resident set size in bytes, now (Linux /proc).

    Not ``ru_maxrss``: a spawned child inherits its parent's high-water mark.
    """
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _big_party(root: str, node: str, role: str, clients: int, mb: int, q: Any) -> None:
    warnings.filterwarnings("ignore")
    import lightning.pytorch as L
    import torch
    from bigmodel import Big

    from lightning_fed import FedAvgStrategy
    from lightning_fed.simulate import threads_per_party

    torch.set_num_threads(threads_per_party(clients + 1))  # as `lightning-fed simulate` does

    class Rss(L.Callback):
        """Samples this process's resident memory every 2 ms from round 1 on."""

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.before = self.peak = _rss()
            threading.Thread(target=self._sample, daemon=True).start()

        def _sample(self) -> None:
            while True:
                self.peak = max(self.peak, _rss())
                time.sleep(0.002)

    L.seed_everything(0, verbose=False)
    rss = Rss()
    strategy = FedAvgStrategy(
        f"{root}/channel",
        "big",
        node,
        role,
        keys=f"{root}/keys",
        rounds=5,
        calculation_timeout=600,
        schedule_timeout=600,
    )
    trainer = L.Trainer(
        strategy=strategy,
        default_root_dir=f"{root}/{node}",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[rss],
        max_epochs=-1 if role == "client" else None,
    )
    model = Big(mb)
    data = model.loader()
    if role == "client":
        trainer.fit(model, train_dataloaders=data)
    else:
        trainer.fit(model, val_dataloaders=data)
        peak = max(rss.peak, _rss())
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        q.put((rss.before, peak, size))


def big_model(work: Path, clients: int, mb: int) -> None:
    import json

    from lightning_fed.simulate import client_id, make_keys

    root = work / "big"
    nodes = ["aggregator"] + [client_id(i) for i in range(clients)]
    make_keys(root, "big", nodes)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(
            target=_big_party,
            args=(str(root), n, "aggregator" if i == 0 else "client", clients, mb, q),
        )
        for i, n in enumerate(nodes)
    ]
    for p in procs:
        p.start()
    before, peak, size = q.get(timeout=1800)
    for p in procs:
        p.join(600)
    report = json.loads((root / "aggregator/fedavg/big/aggregator/report.json").read_text())
    over = _overhead(report)
    print(
        f"overhead per round, {size / 2**20:.0f} MB model, {clients} clients on file://: median "
        f"{statistics.median(over):.2f} s, max {max(over):.2f} s (target <= 2 s); per round: "
        + ", ".join(f"{o:.2f}" for o in over)
    )
    print(
        f"aggregator peak RSS, {clients} clients, {size / 2**20:.0f} MB model: "
        f"{(peak - before) / size:.2f}x the model above its RSS before round 1 (target <= 3x); "
        f"total peak {peak / 2**20:.0f} MB = {peak / size:.2f}x (includes Python, torch and "
        "Lightning)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["accuracy", "big", "ddp"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per accuracy figure")
    parser.add_argument(
        "--mnist-rounds",
        type=int,
        default=5,
        help="rounds of the MNIST federation and epochs of its baseline (the seed's is 5)",
    )
    parser.add_argument("--example", choices=["digits", "mnist"], help="one accuracy figure only")
    parser.add_argument("--ddp-rounds", type=int, default=6, help="rounds of the DDP figure")
    parser.add_argument("--plain-epochs", nargs=3, help=argparse.SUPPRESS)  # a DDP worker
    args = parser.parse_args()
    if args.plain_epochs:
        out, devices, epochs = args.plain_epochs
        _plain_epochs(out, int(devices), int(epochs))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only in (None, "accuracy"):
            accuracy(work, args.seeds, args.mnist_rounds, args.example)
        if args.only in (None, "big"):
            big_model(work, args.clients, args.mb)
        if args.only in (None, "ddp"):
            ddp_client(work, args.ddp_rounds)


if __name__ == "__main__":
    main()
