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
sys.path[:0] = [str(ROOT / "examples" / "digits"), str(ROOT / "examples" / "mnist")]


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
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_fed import FedAvgStrategy
    from lightning_fed.simulate import threads_per_party

    torch.set_num_threads(threads_per_party(clients + 1))  # as `lightning-fed simulate` does
    side = int((mb * 2**20 / 4) ** 0.5)

    class Big(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.big = nn.Linear(side, side, bias=False)
            self.head = nn.Linear(side, 2)

        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.big(x)), y)

        def validation_step(self, batch: Any, idx: int) -> None:
            pass

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-4)

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
    model = Big()
    x = torch.randn(8, side)
    data = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=8)
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
    parser.add_argument("--only", choices=["accuracy", "big"])
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only in (None, "accuracy"):
            accuracy(work, args.seeds, args.mnist_rounds, args.example)
        if args.only in (None, "big"):
            big_model(work, args.clients, args.mb)


if __name__ == "__main__":
    main()
