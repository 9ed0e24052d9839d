"""HeteroNN parties for the multi-process tests (spawned), and the composed model.

Features are pure functions of the ID, so every party, and the central run, see the
same data. Modules are seeded per part, so the central model starts from the same
weights as the parties.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn

from lightning_fed.hetero import HeteroDataModule, HeteroNNModule, HeteroNNStrategy

WIDTH = 4  # every feature model's output width (fused by sum)
DIMS = {"host": 3, "c1": 2, "c2": 5}


def features(node: str, id: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * (1 + list(DIMS).index(node)) + id)
    return torch.randn(DIMS[node], generator=g)


def label(id: int) -> torch.Tensor:
    return torch.tensor(int(features("host", id).sum() + features("c1", id).sum() > 0))


class Data(HeteroDataModule):
    def __init__(self, node: str, lo: int, hi: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.node, self.lo, self.hi = node, lo, hi

    def local_ids(self) -> list[int]:
        return list(range(self.lo, self.hi))[::-1]

    def get_item(self, id: Any) -> Any:
        x = features(self.node, int(id))
        return (x, label(int(id))) if self.node == "host" else x


def feature_model(node: str) -> nn.Module:
    torch.manual_seed(10 + list(DIMS).index(node))
    return nn.Sequential(nn.Linear(DIMS[node], 6), nn.Tanh(), nn.Linear(6, WIDTH))


def inference_model() -> nn.Module:
    torch.manual_seed(99)
    return nn.Sequential(nn.Tanh(), nn.Linear(WIDTH, 2))


class StopAfter(L.Callback):
    """Stops training after a given number of steps, as Lightning's Timer does at max_time."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class Party(HeteroNNModule):
    """A party's model; ``faults`` makes it die or send NaN at a given training step."""

    def __init__(
        self, node: str, lr: float = 0.1, momentum: float = 0.9, faults: Any = None
    ) -> None:
        super().__init__(feature_key=node)
        self.feature_model = feature_model(node)
        self.inference_model = inference_model() if node == "host" else None
        self.lr, self.momentum = lr, momentum
        self.faults = faults or {}
        self.steps = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.steps += 1
        if self.faults.get("die_at_step") == self.steps:
            os.kill(os.getpid(), signal.SIGKILL)

    def forward_features(self, data: Any) -> torch.Tensor:
        z = super().forward_features(data)
        if self.training and self.faults.get("nan_at_step") == self.steps:
            z = z * float("nan")
        return z

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def run_party(
    root: str, node: str, parties: list[str], ranges: dict[str, Any], opts: dict[str, Any]
) -> None:
    """One party: fit (and test), then save its weights to ``<root>/<node>.pt``."""
    warnings.filterwarnings("ignore")
    logging.basicConfig(filename=str(Path(root) / f"{node}.log"), level=logging.INFO)
    role = "host" if node == "host" else "collaborator"
    strategy = HeteroNNStrategy(
        str(Path(root) / "channel"),
        "t",
        node,
        role,
        host="host",
        collaborators=[p for p in parties if p != "host"] if role == "host" else None,
        keys=str(Path(root) / "keys"),
        calculation_timeout=opts.get("calculation_timeout", 60),
        schedule_timeout=60,
        psi_workers=1,
        recovery=opts.get("recovery", False),
        state_dir=str(Path(root) / node / "state"),
        output_dir=str(Path(root) / node),
        log_rounds=opts.get("log_rounds") if role == "host" else None,
    )
    trainer = L.Trainer(
        strategy=strategy,
        max_epochs=opts.get("epochs", 3) if role == "host" else -1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        check_val_every_n_epoch=opts.get("val_every", {}).get(node, 1),
        max_steps=opts.get("max_steps", -1) if role == "host" else -1,
        callbacks=[StopAfter(opts["stop_after_step"])]
        if "stop_after_step" in opts and role == "host"
        else [],
    )
    model = Party(node, faults=opts.get("faults", {}).get(node))
    model.is_feature_trainable = node not in opts.get("frozen", ())
    batch_size = opts.get("batch_sizes", {}).get(node, 8)
    seed = opts.get("seeds", {}).get(node, 0)
    data = Data(node, *ranges[node], batch_size=batch_size, test_fraction=0.2, seed=seed)
    try:
        trainer.fit(model, datamodule=data)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if opts.get("test"):
            tested = trainer.test(model, datamodule=data, verbose=False)
            if role == "host":
                metrics.update(tested[0])
        saved = {
            "state": model.state_dict(),
            "train_ids": data.train_ids,
            "metrics": metrics,
            "report": strategy.report,
        }
        torch.save(saved, Path(root) / f"{node}.pt")
    except Exception as exc:
        logging.getLogger("party").exception("FAILED")
        (Path(root) / f"{node}.error").write_text(f"{type(exc).__name__}: {exc}")
        sys.exit(1)


class Composed(L.LightningModule):
    """Every party's feature model, the sum fusion and the inference model, in one module."""

    def __init__(
        self, nodes: list[str], lr: float = 0.1, momentum: float = 0.9, frozen: Any = ()
    ) -> None:
        super().__init__()
        self.nodes = nodes
        self.features = nn.ModuleDict({n: feature_model(n) for n in nodes})
        for n in frozen:
            self.features[n].requires_grad_(False)
        self.inference = inference_model()
        self.lr, self.momentum = lr, momentum

    def training_step(self, batch: Any, idx: int) -> torch.Tensor:
        xs, y = batch
        fused = torch.stack([self.features[n](xs[n]) for n in sorted(self.nodes)]).sum(0)
        return nn.functional.cross_entropy(self.inference(fused), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def composed_batches(
    nodes: list[str], train_ids: list[int], epochs: int, batch_size: int
) -> list[Any]:
    from lightning_fed.hetero.order import batches, epoch_order

    out = []
    for epoch in range(epochs):
        for ids in batches(epoch_order(train_ids, epoch, 0), batch_size):
            xs = {n: torch.stack([features(n, i) for i in ids]) for n in nodes}
            out.append((xs, torch.stack([label(i) for i in ids])))
    return out
