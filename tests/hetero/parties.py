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
from lightning_fed.hetero.secure import SecureHeteroNNModule

WIDTH = 4  # every feature model's output width (fused by sum)
DIMS = {"host": 3, "c1": 2, "c2": 5}
PROJECTED = 3  # secure: every projection is WIDTH -> PROJECTED (not square)
PROJECT_LR = 0.05


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


def inference_model(width: int = WIDTH) -> nn.Module:
    torch.manual_seed(99)
    return nn.Sequential(nn.Tanh(), nn.Linear(width, 2))


def project_layer_config(nodes: list[str]) -> list[tuple[str, int, int]]:
    return [(n, WIDTH, PROJECTED) for n in nodes]


def share_seed(node: str) -> int:
    """Seeds the secure parts a party makes (the host's projection and shares)."""
    return 50 + list(DIMS).index(node)


class StopAfter(L.Callback):
    """Stops training after a given number of steps, as Lightning's Timer does at max_time."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class Behaviour:
    """What the test parties do on top of their module: faults, SGD with momentum."""

    lr: float
    momentum: float
    faults: dict[str, Any]
    steps: int

    def setup_behaviour(self, lr: float, momentum: float, faults: Any) -> None:
        self.lr, self.momentum = lr, momentum
        self.faults = faults or {}
        self.steps = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.steps += 1
        if self.faults.get("die_at_step") == self.steps:
            os.kill(os.getpid(), signal.SIGKILL)

    def forward_features(self, data: Any) -> torch.Tensor:
        z: torch.Tensor = super().forward_features(data)  # type: ignore[misc]
        if self.training and self.faults.get("nan_at_step") == self.steps:  # type: ignore[attr-defined]
            z = z * float("nan")
        return z

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.parameters()  # type: ignore[attr-defined]
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


class Party(Behaviour, HeteroNNModule):
    """A party's model; ``faults`` makes it die or send NaN at a given training step."""

    def __init__(
        self, node: str, lr: float = 0.1, momentum: float = 0.9, faults: Any = None
    ) -> None:
        super().__init__(feature_key=node)
        self.feature_model = feature_model(node)
        self.inference_model = inference_model() if node == "host" else None
        self.setup_behaviour(lr, momentum, faults)


class SecureParty(Behaviour, SecureHeteroNNModule):
    """A secure party: every feature model projected WIDTH -> PROJECTED, fused by sum."""

    def __init__(
        self, node: str, nodes: list[str], faults: Any = None, project_lr: float = PROJECT_LR
    ) -> None:
        super().__init__(node, project_layer_config(nodes), project_lr)
        self.feature_model = feature_model(node)
        self.inference_model = inference_model(PROJECTED) if node == "host" else None
        self.setup_behaviour(0.1, 0.9, faults)
        self.sent: list[torch.Tensor] = []  # every feature tensor this party computed

    def configure_model(self) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(share_seed(self.feature_key))
            super().configure_model()

    def forward_features(self, data: Any) -> torch.Tensor:
        z = super().forward_features(data)
        self.sent.append(z.detach().clone())
        return z


def record_deliveries() -> list[dict[str, Any]]:
    """Keep a copy of every message this process's channel delivers (body and tensors)."""
    from lightning_fed.channel import Channel

    received: list[dict[str, Any]] = []
    deliver = Channel._deliver_all

    def recording(self: Channel, *args: Any, **kwargs: Any) -> Any:
        messages = deliver(self, *args, **kwargs)
        for msg in messages:
            tensors = {k: v.clone() for k, v in msg.tensors.items()}
            received.append({"kind": msg.kind, "body": msg.body, "tensors": tensors})
        return messages

    Channel._deliver_all = recording  # type: ignore[method-assign]
    return received


def run_party(
    root: str, node: str, parties: list[str], ranges: dict[str, Any], opts: dict[str, Any]
) -> None:
    """One party: fit (and test), then save its weights to ``<root>/<node>.pt``."""
    warnings.filterwarnings("ignore")
    logging.basicConfig(filename=str(Path(root) / f"{node}.log"), level=logging.INFO)
    role = "host" if node == "host" else "collaborator"
    received = record_deliveries() if opts.get("secure") and role == "host" else None
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
    faults = opts.get("faults", {}).get(node)
    model: Party | SecureParty = (
        SecureParty(node, parties, faults, opts.get("project_lr", {}).get(node, PROJECT_LR))
        if opts.get("secure")
        else Party(node, faults=faults)
    )
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
            "sent": getattr(model, "sent", None),
            "received": received,
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


class SecureComposed(L.LightningModule):
    """The secure parties' model in one module: projections with weights W + ε_acc.

    The collaborators' projections train by plain SGD at PROJECT_LR, as the secure
    layer does; everything else by the parties' SGD with momentum.
    """

    def __init__(self, nodes: list[str]) -> None:
        super().__init__()
        from lightning_fed.hetero.secure.interactive import initial_share, own_projection

        self.nodes = nodes
        self.features = nn.ModuleDict({n: feature_model(n) for n in nodes})
        self.inference = inference_model(PROJECTED)
        with torch.random.fork_rng():
            torch.manual_seed(share_seed("host"))
            self.projection = own_projection(WIDTH, PROJECTED)
            host_shares = {n: initial_share(WIDTH, PROJECTED) for n in nodes if n != "host"}
        trues = {}
        for n, share in host_shares.items():
            with torch.random.fork_rng():
                torch.manual_seed(share_seed(n))
                trues[n] = nn.Parameter(share + initial_share(WIDTH, PROJECTED))
        self.trues = nn.ParameterDict(trues)

    def project(self, node: str, x: torch.Tensor) -> torch.Tensor:
        alpha = self.features[node](x)
        if node == "host":
            return self.projection(alpha)
        return (alpha.double() @ self.trues[node]).float()

    def training_step(self, batch: Any, idx: int) -> torch.Tensor:
        xs, y = batch
        fused = torch.stack([self.project(n, xs[n]) for n in sorted(self.nodes)]).sum(0)
        return nn.functional.cross_entropy(self.inference(fused), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        rest = [p for name, p in self.named_parameters() if not name.startswith("trues.")]
        groups = [
            {"params": rest, "lr": 0.1, "momentum": 0.9},
            {"params": list(self.trues.parameters()), "lr": PROJECT_LR, "momentum": 0.0},
        ]
        return torch.optim.SGD(groups)
