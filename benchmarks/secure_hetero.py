"""Secure HeteroNN figures: accuracy and epoch time against plain HeteroNN and plain Lightning.

    .venv/bin/python benchmarks/secure_hetero.py                  # both examples, 3 seeds
    .venv/bin/python benchmarks/secure_hetero.py --seeds 1 --only mnist_halves

For each example (digits halves, 15 epochs; the seed's MNIST halves, 10 epochs,
batch 128, feature width 20) and seed, three runs in this script:

1. secure HeteroNN: ``secure_host.yaml`` + ``secure_collaborator.yaml`` as
   ``lightning-fed simulate`` runs them (two processes, a local folder, PSI, CKKS);
2. plain HeteroNN: ``host.yaml`` + ``collaborator.yaml``, the same way;
3. plain Lightning: the composed model (both feature models, sum, inference model)
   trained centrally on the same split, as benchmarks/hetero.py does.

Printed: test accuracy of each (target: secure within 1 pp of plain HeteroNN);
the host's epoch time (epochs after the first, validation included) of secure vs
plain HeteroNN (target <= 10x on MNIST halves) and vs plain Lightning; per training
batch, where the secure time goes: the collaborator's encryption and decryption,
the host's HE products, PyTorch and everything else on the host, and the rest
(channel I/O and waiting), from the parties' ``report.json`` phase timers; and the
bytes the host moves per batch.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks")]

from hetero import (  # noqa: E402 (the sibling script)
    EXAMPLES,
    _arguments,
    _central,
    _common_ids,
    _federated,
    _later,
)


def _median(report: dict[str, Any], what: str) -> float:
    return statistics.median(e[what] for e in _later(report))


def _per_batch(report: dict[str, Any], phase: str) -> float:
    return statistics.median(e["phases"].get(phase, 0.0) / e["batches"] for e in _later(report))


def main() -> None:
    args = _arguments(__doc__.splitlines()[0])
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="secure-hetero-bench-") as tmp:
        work = Path(tmp)
        for name in EXAMPLES:
            if args.only and name != args.only:
                continue
            epochs = EXAMPLES[name][0]
            common = _common_ids(name)
            acc: dict[str, list[float]] = {"secure": [], "plain": [], "central": []}
            ratios, central_ratios = [], []
            for seed in range(args.seeds):
                host, guest = _federated(name, work, seed, secure=True)
                plain, _ = _federated(name, work, seed)
                central_acc, central_batch, batches = _central(name, common, seed)
                acc["secure"].append(host["test_metrics"]["test_acc"])
                acc["plain"].append(plain["test_metrics"]["test_acc"])
                acc["central"].append(central_acc)
                secure_epoch, plain_epoch = _median(host, "seconds"), _median(plain, "seconds")
                ratios.append(secure_epoch / plain_epoch)
                central_ratios.append(secure_epoch / (central_batch * batches))
                per_batch = _median(host, "train_seconds") / batches
                encrypt, decrypt = _per_batch(guest, "encrypt"), _per_batch(guest, "decrypt")
                he = _per_batch(host, "he")
                exchange = statistics.median(
                    e["exchange_seconds"] / e["batches"] for e in _later(host)
                )
                torch_rest = per_batch - exchange - he
                waiting = exchange - encrypt - decrypt
                moved = statistics.median(
                    (e["bytes_sent"] + e["bytes_received"]) / e["batches"] for e in _later(host)
                )
                print(
                    f"{name} seed {seed} ({epochs} epochs, {batches} batches/epoch): test_acc "
                    f"secure {acc['secure'][-1]:.4f} | plain HeteroNN {acc['plain'][-1]:.4f} | "
                    f"plain Lightning {central_acc:.4f}\n"
                    f"  host epoch time: secure {secure_epoch:.2f} s, plain HeteroNN "
                    f"{plain_epoch:.2f} s ({ratios[-1]:.2f}x), plain Lightning "
                    f"{central_batch * batches:.2f} s ({central_ratios[-1]:.1f}x)\n"
                    f"  secure, per training batch {1000 * per_batch:.1f} ms: encrypt "
                    f"{1000 * encrypt:.1f} | host HE {1000 * he:.1f} | decrypt "
                    f"{1000 * decrypt:.1f} | channel and the collaborator's PyTorch "
                    f"{1000 * waiting:.1f} | the host's PyTorch and the rest "
                    f"{1000 * torch_rest:.1f} ms; the host moves {moved / 1024:.0f} KiB per "
                    "batch",
                    flush=True,
                )
            means = {k: statistics.mean(v) for k, v in acc.items()}
            diff = 100 * (means["secure"] - means["plain"])
            ratio = statistics.median(ratios)
            print(
                f"{name} mean of {args.seeds} seed(s): secure {means['secure']:.4f} | plain "
                f"HeteroNN {means['plain']:.4f} | plain Lightning {means['central']:.4f} | "
                f"secure - plain HeteroNN {diff:+.2f} pp (target within 1 pp: "
                f"{'met' if abs(diff) <= 1 else 'NOT met'}) | epoch time secure / plain "
                f"HeteroNN {ratio:.2f}x"
                + (
                    f" (target <= 10x: {'met' if ratio <= 10 else 'NOT met'})"
                    if name == "mnist_halves"
                    else ""
                )
                + f", secure / plain Lightning {statistics.median(central_ratios):.1f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
