"""HeteroNN figures: accuracy against the composed model trained centrally, per-batch overhead.

    .venv/bin/python benchmarks/hetero.py                    # both examples, 3 seeds each
    .venv/bin/python benchmarks/hetero.py --seeds 1 --only mnist_halves

1. Accuracy: each example (digits halves, 15 epochs; the seed's MNIST halves, 10
   epochs) runs as ``lightning-fed simulate`` does: a host and a collaborator, each
   its own process, over a local folder, aligned by the private set intersection.
   Next to it, in this script, plain Lightning trains the composed model (both
   feature models, the sum and the inference model in one module) on the same
   common IDs' training split for the same epochs, with the same optimiser, from
   the same initial weights (each party's, rebuilt from its seed) and in the same
   batch order, and tests it on the same held-out split; only the dropout masks
   differ. Means over ``--seeds`` training seeds.
2. Per-batch framework overhead on ``file://`` (MNIST halves, batch 128): the host's
   training time per batch (its report: from an epoch's start to its last batch's
   end, epochs after the first) minus plain Lightning's time per batch for the
   composed model on the same batches, both with one PyTorch thread (each party of
   the 2-process simulation on this 2-core machine gets one). The split-learning
   computation is the same as the composed model's and runs one party after the
   other, so the difference is what the framework adds: features and gradients
   through the channel (serialise, hash, sign, write, poll, read), checks, and the
   per-ID data path. Bytes per batch: what the host writes and reads per batch.

The PSI figures are benchmarks/psi.py's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples" / "digits_halves"), str(ROOT / "examples" / "mnist_halves")]

EXAMPLES = {  # name: epochs (as in the example's host.yaml), test_fraction, lr, momentum
    "digits_halves": (15, 0.2, 0.05, 0.9),
    "mnist_halves": (10, 0.2, 0.01, 0.9),
}


def _federated(
    name: str, work: Path, seed: int, secure: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One simulated federation of an example (its ``secure_*.yaml`` configs with
    ``secure``): the host's report and the collaborator's."""
    import json

    from lightning_fed.node.party import party_dir
    from lightning_fed.simulate import simulate_hetero

    ex = ROOT / "examples" / name
    prefix = "secure_" if secure else ""
    task = f"{'secure-' if secure else ''}{name.replace('_', '-')}-{seed}"
    with open(work / f"{task}.log", "w") as log:
        res = simulate_hetero(
            ex / f"{prefix}host.yaml",
            [ex / f"{prefix}collaborator.yaml"],
            workdir=work / task,
            task_id=task,
            host_args=[f"--seed_everything={seed}"],
            collaborator_args=[f"--seed_everything={seed + 100}"],
            out=log,
        )
    if not res.ok or not res.report:
        raise SystemExit(f"{task}: the HeteroNN run failed; see {log.name}")
    node = "collaborator-1"
    report = party_dir(work / task / node, "heteronn", task, node) / "report.json"
    return res.report, json.loads(report.read_text())


def _later(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The epochs after the first (warm), or the only one."""
    epochs: list[dict[str, Any]] = report["epochs"]
    return epochs[1:] or epochs


def _arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", choices=sorted(EXAMPLES))
    return parser.parse_args()


def _central_parts(name: str, seed: int) -> tuple[Any, Any, Any, Callable[[list[int]], Any]]:
    """The composed model, its loss, the host's datamodule, and a loader of full images.

    The composed model starts from the parties' initial weights: each party's
    LightningCLI seeds everything, then builds its model (host: ``seed``,
    collaborator: ``seed + 100``, as ``_federated`` runs them).
    """
    import lightning.pytorch as L
    import torch
    import torch.nn.functional as F

    if name == "digits_halves":
        from digits_halves import ComposedDigits, DigitsHalf, DigitsHalfNet, _digits

        composed, party, data = ComposedDigits(), DigitsHalfNet, DigitsHalf("left")
        x, y = _digits()
        loss = F.cross_entropy
    else:
        from mnist_halves import ComposedMnist, MnistHalf, MnistHalfNet, _images

        composed, party, data = ComposedMnist(), MnistHalfNet, MnistHalf("left")
        x, y = _images(data.source, data.root)
        loss = F.nll_loss
    L.seed_everything(seed, verbose=False)
    host = party(feature_key="left", host=True)
    L.seed_everything(seed + 100, verbose=False)
    collaborator = party(feature_key="right", host=False)
    composed.left, composed.right = host.feature_model, collaborator.feature_model
    composed.head = host.inference_model
    return composed, loss, data, lambda ids: (x[torch.tensor(ids)], y[torch.tensor(ids)])


def _central(name: str, common: list[int], seed: int) -> tuple[float, float, int]:
    """Plain Lightning on the composed model: (test accuracy, seconds per batch, batches)."""
    import lightning.pytorch as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_fed.hetero.data import EpochOrder

    epochs, test_fraction, lr, momentum = EXAMPLES[name]
    model, loss_fn, data, full = _central_parts(name, seed)
    data.test_fraction = test_fraction
    data.align(common)  # the same split as the parties'
    train = TensorDataset(*full(list(data.train_ids or [])))
    test = TensorDataset(*full(list(data.test_ids or [])))

    class Central(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.batch_seconds: list[float] = []

        def training_step(self, batch: Any, idx: int) -> Any:
            return loss_fn(self.net(batch[0]), batch[1])

        def test_step(self, batch: Any, idx: int) -> None:
            self.log("test_acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean())

        def on_train_epoch_start(self) -> None:
            self._t0 = time.perf_counter()

        def on_train_epoch_end(self) -> None:
            batches = self.trainer.num_training_batches
            self.batch_seconds.append((time.perf_counter() - self._t0) / batches)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum)

    central = Central()
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    order = EpochOrder(data.train_ids or [], data.seed)  # the parties' batches, epoch by epoch
    trainer.fit(central, DataLoader(train, batch_size=data.batch_size, sampler=order))
    acc = trainer.test(central, DataLoader(test, batch_size=data.batch_size), verbose=False)
    per_batch = statistics.median(central.batch_seconds[1:] or central.batch_seconds)
    return float(acc[0]["test_acc"]), per_batch, int(trainer.num_training_batches)


def _common_ids(name: str) -> list[int]:
    """The intersection the parties find (the ID ranges of the example's two configs)."""
    import yaml

    ex = ROOT / "examples" / name
    ranges = []
    for cfg in ("host.yaml", "collaborator.yaml"):
        args = yaml.safe_load((ex / cfg).read_text())["data"]["init_args"]
        ranges.append(set(range(args["first_id"], args["last_id"] + 1)))
    return sorted(ranges[0] & ranges[1])


def main() -> None:
    args = _arguments(__doc__.splitlines()[0])
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="hetero-bench-") as tmp:
        work = Path(tmp)
        for name in EXAMPLES:
            if args.only and name != args.only:
                continue
            epochs = EXAMPLES[name][0]
            common = _common_ids(name)
            feds, centrals, overheads, bytes_per_batch = [], [], [], []
            for seed in range(args.seeds):
                report, _ = _federated(name, work, seed)
                if report["common_ids"] != len(common):
                    raise SystemExit(
                        f"{name}: PSI found {report['common_ids']} IDs, not {len(common)}"
                    )
                acc, central_batch, batches = _central(name, common, seed)
                feds.append(report["test_metrics"]["test_acc"])
                centrals.append(acc)
                later = _later(report)
                fed_batch = statistics.median(e["train_seconds"] / e["batches"] for e in later)
                exchange = statistics.median(e["exchange_seconds"] / e["batches"] for e in later)
                moved = statistics.median(
                    (e["bytes_sent"] + e["bytes_received"]) / e["batches"] for e in later
                )
                overheads.append(fed_batch - central_batch)
                bytes_per_batch.append(moved)
                print(
                    f"{name} seed {seed}: HeteroNN test_acc {feds[-1]:.4f} | composed, central "
                    f"{centrals[-1]:.4f} ({epochs} epochs) | per batch: HeteroNN host "
                    f"{1000 * fed_batch:.1f} ms (in the exchange {1000 * exchange:.1f} ms), plain "
                    f"Lightning {1000 * central_batch:.1f} ms, "
                    f"ratio {fed_batch / central_batch:.2f}x "
                    f"| host moves {moved / 1024:.1f} KiB per batch ({batches} batches/epoch)",
                    flush=True,
                )
            mean_fed, mean_central = statistics.mean(feds), statistics.mean(centrals)
            diff = 100 * (mean_fed - mean_central)
            print(
                f"{name} mean of {args.seeds} seed(s): HeteroNN {mean_fed:.4f} | composed "
                f"central {mean_central:.4f} | difference {diff:+.2f} pp (target within 1 pp: "
                f"{'met' if abs(diff) <= 1 else 'NOT met'})",
                flush=True,
            )
            if name == "mnist_halves":
                over = statistics.median(overheads)
                print(
                    f"{name} framework overhead per batch on file:// (median of {len(overheads)} "
                    f"runs): {1000 * over:.1f} ms (target <= 15 ms: "
                    f"{'met' if over <= 0.015 else 'NOT met'}); bytes moved per batch by the "
                    f"host: {statistics.median(bytes_per_batch) / 1024:.1f} KiB",
                    flush=True,
                )


if __name__ == "__main__":
    main()
