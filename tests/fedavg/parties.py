"""Federation parties for the multi-process FedAvg tests (started with spawn).

Each party is a real Lightning Trainer with ``FedAvgStrategy`` in its own process,
logging to ``<root>/<node>.log``. Behaviour switches (``opts``) make faulty clients:
one that dies in a given round, one that is slow, one that sends NaN weights.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from tests.processes import CTX

FEATURES = 6


def dataset(seed: int, n: int) -> TensorDataset:
    """A small synthetic classification set (linearly separable-ish, seeded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    w = torch.arange(1, FEATURES + 1, dtype=torch.float32)
    y = ((x @ w) > 0).long()
    return TensorDataset(x, y)


class TinyNet(L.LightningModule):
    """A two-layer MLP; ``opts`` turns it into a faulty client for a test."""

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, opts: dict[str, Any] | None = None):
        super().__init__()
        self.opts = opts or {}
        hidden = int(self.opts.get("hidden", 8))  # another width does not fit the global model
        self.net = nn.Sequential(nn.Linear(FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        if self.opts.get("batchnorm"):  # a layer Opacus refuses (it mixes examples)
            self.net.insert(1, nn.BatchNorm1d(hidden))
        self.lr, self.momentum = lr, momentum
        self.epochs_done = 0
        # Two optimisers (one per layer) stepped by hand, as a GAN-style module would.
        self.automatic_optimization = not self.opts.get("manual", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        if self.opts.get("fail_in_setup"):  # before the strategy opens its channel
            raise RuntimeError("the data folder /data/hospital-b is missing")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        if not self.automatic_optimization:
            optimizers = self.optimizers()
            assert isinstance(optimizers, list)
            for optimizer in optimizers:
                optimizer.zero_grad()
            self.manual_backward(loss)
            for optimizer in optimizers:
                optimizer.step()
            if self.trainer.is_last_batch:  # manual optimisation steps its schedulers too
                schedulers = self.lr_schedulers()
                for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                    scheduler.step()  # type: ignore[union-attr]
        return loss

    def on_train_epoch_start(self) -> None:
        # The round this epoch trains for (one local epoch per round in these tests).
        round = self.epochs_done + 1
        if self.opts.get("log_optimizer"):  # what the optimizer starts the round with
            optimizer = self.trainer.optimizers[0]
            held = sum(len(s) for s in optimizer.state.values())
            self.log("optimizer_state_tensors", float(held), on_epoch=True)
            self.log("lr_at_round_start", float(optimizer.param_groups[0]["lr"]), on_epoch=True)
        if self.opts.get("die_in_round") == round:
            os.kill(os.getpid(), signal.SIGKILL)
        fail = self.opts.get("raise_on_rank")  # (round, rank): that DDP rank fails
        if fail is not None and fail == [round, self.global_rank]:
            raise RuntimeError(f"rank {self.global_rank} ran out of memory in round {round}")
        if self.opts.get("die_on_rank") == [round, self.global_rank]:  # killed, no word
            os.kill(os.getpid(), signal.SIGKILL)
        hold = self.opts.get("hold_in_round")  # (round, path): wait until the test says go
        if hold is not None and hold[0] == round:
            deadline = time.monotonic() + 240
            while not Path(hold[1]).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.opts.get("slow_in_round") == round:
            time.sleep(float(self.opts["slow_seconds"]))
        time.sleep(float(self.opts.get("slow_every_round", 0)))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.opts.get("nan_in_round") == self.epochs_done + 1:
            with torch.no_grad():
                self.net[0].weight[0, 0] = float("nan")

    def on_train_epoch_end(self) -> None:
        self.epochs_done += 1

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        def sgd(params: Any) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

        if not self.automatic_optimization:
            first, second = sgd(self.net[0].parameters()), sgd(self.net[2].parameters())
            halve = [torch.optim.lr_scheduler.StepLR(o, 1, 0.5) for o in (first, second)]
            return [first, second], halve
        optimizer = sgd(self.parameters())
        schedule = self.opts.get("scheduler")
        if schedule == "epoch":  # halves the rate after every epoch (= round)
            scheduler: Any = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
        elif schedule == "step":  # decays the rate after every optimizer step
            scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9)
        else:
            return optimizer
        interval = "epoch" if schedule == "epoch" else "step"
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
        }


def noisy_dataset(seed: int, n: int, shift: float) -> TensorDataset:
    """Validation data whose inputs are shifted and labels noisy, so clients differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g) + shift
    w = torch.arange(1, FEATURES + 1, dtype=torch.float32)
    y = ((x @ w + 8 * torch.randn(n, generator=g)) > 0).long()
    return TensorDataset(x, y)


class MetricNet(TinyNet):
    """TinyNet validated with torchmetrics objects, and one AUROC logged as a plain float."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

        self.accuracy = BinaryAccuracy()
        self.auroc = BinaryAUROC()
        self.test_auroc = BinaryAUROC()
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        scores = self(x).softmax(dim=1)[:, 1]
        self.accuracy(scores, y)
        self.auroc(scores, y)
        self.log("val_acc", self.accuracy)  # Metric objects: merged exactly
        self.log("val_auroc", self.auroc)
        self._seen.append((scores, y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        scores = self(x).softmax(dim=1)[:, 1]
        self.test_auroc(scores, y)
        self.log("test_auroc", self.test_auroc)
        accuracy = ((scores > 0.5).long() == y).float().mean()
        self.log("test_acc", accuracy, sync_dist=True)  # a plain float (a mean over DDP ranks)

    def on_validation_epoch_end(self) -> None:
        from torchmetrics.functional.classification import binary_auroc

        if self._seen:  # the same AUROC as a float: only a weighted mean can be made of it
            scores, labels = (torch.cat(t) for t in zip(*self._seen, strict=True))
            self.log("val_auroc_plain", binary_auroc(scores, labels))
        self._seen = []


def _logging(root: str, node: str) -> None:
    warnings.filterwarnings("ignore")
    handler = logging.FileHandler(Path(root) / f"{node}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)


def tamper_updates(round: int | None, how: str) -> None:
    """Make this process's client send broken tensors in ``round``'s update (None: all).

    It wraps ``Channel.send`` in this process only, standing for a buggy or hostile
    client: everything else (its Trainer, its model) stays real and healthy.
    """
    from lightning_fed.channel import Channel

    send = Channel.send

    def broken(self: Channel, kind: str, body: Any = None, **kw: Any) -> int:
        tensors = kw.get("tensors")
        if kind == "update" and round in (None, kw.get("round")) and tensors is not None:
            t = dict(tensors)
            if how == "shape":
                t["net.0.weight"] = torch.zeros(3, 3)
            elif how == "dtype":
                t["net.0.bias"] = t["net.0.bias"].double()
            elif how == "keys":
                t.pop("net.2.bias")
                t["net.9.weight"] = torch.zeros(2)
            elif how == "inf":
                t["net.2.weight"] = t["net.2.weight"].clone().fill_(float("inf"))
            elif how == "huge":  # finite, well-formed, and far from every honest update
                t = {k: v.clone().fill_(100) if v.is_floating_point() else v for k, v in t.items()}
            kw["tensors"] = t
        return send(self, kind, body, **kw)

    Channel.send = broken  # type: ignore[method-assign]


def sabotage(plans: list[tuple[str, int, str]]) -> None:
    """Make this process misbehave around what it sends: ``(kind, round, how)`` with
    ``how`` one of ``die_before`` / ``die_after`` (SIGKILL around sending that message),
    ``garble`` (its tensors' bytes replaced by random ones of the same length),
    ``short`` (every tensor one element short) or ``swap_keys`` (an aggregator in the
    middle: the first advert of a secure-aggregation roster gets keys of its own,
    keeping the client's signature). Everything else stays real."""
    from lightning_fed.channel import Channel

    send = Channel.send

    def wrapped(self: Channel, kind: str, body: Any = None, **kw: Any) -> int:
        hows = [h for k, r, h in plans if k == kind and r == kw.get("round")]
        tensors = kw.get("tensors")
        if "die_before" in hows:
            os.kill(os.getpid(), signal.SIGKILL)
        if tensors is not None and "garble" in hows:
            kw["tensors"] = {
                k: torch.randint(0, 256, v.shape, dtype=torch.uint8)
                if v.dtype == torch.uint8
                else v
                for k, v in tensors.items()
            }
        if tensors is not None and "short" in hows:
            kw["tensors"] = {k: v.reshape(-1)[:-1] for k, v in tensors.items()}
        if "swap_keys" in hows:
            from lightning_fed.privacy.keys import KeyPair

            adverts = dict(body["adverts"])
            victim = sorted(adverts)[0]
            adverts[victim] = {**adverts[victim], "c": KeyPair().public.hex()}
            body = {**body, "adverts": adverts}
        seq = send(self, kind, body, **kw)
        if "die_after" in hows:
            os.kill(os.getpid(), signal.SIGKILL)
        return seq

    Channel.send = wrapped  # type: ignore[method-assign]


def record_views(root: str, node: str, role: str) -> None:
    """Keep copies of what others could see, for the leak scans of the privacy tests.

    Every process copies each object it publishes to storage (the storage operator's
    view) into ``<root>/views/published``. The aggregator copies the tensors of every
    message it receives into ``views/received``. A client saves, per round, its plain
    update: the weights it trained, their change from the round's global model, and
    (secure rounds) the quantised integers it masks, in ``views/plain``. Nothing is
    changed: the functions are wrapped, not replaced.
    """
    import uuid

    import lightning_fed.fedavg.client_hooks as hooks
    from lightning_fed.channel.channel import Channel
    from lightning_fed.channel.store import Store
    from lightning_fed.privacy.vector import Layout

    out = Path(root) / "views"
    for sub in ("published", "received", "plain"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    publish = Store.publish

    def publishing(self: Store, key: str, data: Any, **kw: Any) -> None:
        chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else data
        blob = b"".join(bytes(c) for c in chunks)
        (out / "published" / f"{node}-{uuid.uuid4().hex}").write_bytes(blob)
        publish(self, key, data, **kw)

    Store.publish = publishing  # type: ignore[method-assign]
    if role == "aggregator":
        deliver = Channel._deliver_all

        def delivering(self: Channel, taken: Any, *, consume: bool) -> Any:
            messages = deliver(self, taken, consume=consume)
            for m in messages:
                blob = b"".join(
                    t.contiguous().view(torch.uint8).numpy().tobytes()
                    for t in m.tensors.values()
                    if t.numel()
                )
                (out / "received" / f"{m.sender}-{m.kind}-{m.seq}").write_bytes(
                    blob + json.dumps(m.body).encode()
                )
            return messages

        Channel._deliver_all = delivering  # type: ignore[method-assign]
        return
    seen: dict[str, Any] = {}
    load, state_of, encode = hooks.load_state, hooks.federated_state, Layout.encode

    def loading(module: Any, tensors: Any, *args: Any, **kw: Any) -> Any:
        seen["global"] = {k: v.clone() for k, v in tensors.items()}
        return load(module, tensors, *args, **kw)

    def state(module: Any, names: Any) -> Any:
        got = state_of(module, names)
        if "global" in seen:
            n = seen["n"] = seen.get("n", 0) + 1
            plain = {f"w/{k}": v.detach().clone() for k, v in got.items()}
            plain.update(
                {
                    f"d/{k}": (v.detach().double() - seen["global"][k].double()).float()
                    for k, v in got.items()
                }
            )
            torch.save(plain, out / "plain" / f"{node}-{n}.pt")
        return got

    def encoding(self: Any, *args: Any, **kw: Any) -> Any:
        # the plain integers, also where the client writes them into its masks (add_to)
        levels = encode(self, *args, **{**kw, "add_to": None})
        torch.save({"levels": levels}, out / "plain" / f"{node}-levels-{uuid.uuid4().hex}.pt")
        return encode(self, *args, **kw)

    hooks.load_state, hooks.federated_state = loading, state  # type: ignore[assignment]
    Layout.encode = encoding  # type: ignore[method-assign]


def run_party(
    root: str, node: str, role: str, strategy_kwargs: dict[str, Any], party: dict[str, Any]
) -> None:
    """One party: a Trainer with FedAvgStrategy over ``root/channel``; exits 1 on failure."""
    _logging(root, node)
    from lightning_fed import FedAvgStrategy

    for module in party.get("imports", []):  # e.g. the module defining a custom algorithm
        importlib.import_module(module)

    if "tamper" in party:
        tamper_updates(*party["tamper"])
    if party.get("record_views"):
        record_views(root, node, role)
    if "sabotage" in party:
        sabotage([tuple(p) for p in party["sabotage"]])
    if "tamper_every_round" in party:
        tamper_updates(None, party["tamper_every_round"])
    L.seed_everything(party.get("seed", 0), verbose=False)
    strategy = FedAvgStrategy(
        party.get("url", str(Path(root) / "channel")),
        "t",
        node,
        role,
        keys=str(Path(root) / "keys"),
        **strategy_kwargs,
    )
    settings: dict[str, Any] = {
        "default_root_dir": str(Path(root) / node),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": role == "aggregator",
        "max_epochs": -1 if role == "client" else None,
        "num_sanity_val_steps": 0,
        "deterministic": True,
        **party.get("trainer", {}),  # precision, accumulate_grad_batches...
    }
    callbacks = party.get("callbacks", {})  # Lightning's own, on this party
    if "checkpoint" in callbacks:
        from lightning.pytorch.callbacks import ModelCheckpoint

        settings["enable_checkpointing"] = True
        settings.setdefault("callbacks", []).append(ModelCheckpoint(**callbacks["checkpoint"]))
    if "early_stopping" in callbacks:
        from lightning.pytorch.callbacks import EarlyStopping

        settings.setdefault("callbacks", []).append(EarlyStopping(**callbacks["early_stopping"]))
    if party.get("csv_logger"):
        from lightning.pytorch.loggers import CSVLogger

        settings["logger"] = CSVLogger(str(Path(root) / node / "csv"), name="", version="")
    trainer = L.Trainer(strategy=strategy, **settings)
    make = MetricNet if party.get("model") == "metrics" else TinyNet
    model = make(party.get("lr", 0.1), party.get("momentum", 0.0), party.get("opts"))
    if party.get("dry_run"):  # measures how long a party takes to get this far
        return
    data_seed, n = party.get("data_seed", 0), party.get("n", 64)
    batch = party.get("batch_size", 16)
    data: Any = dataset(data_seed, n)
    if party.get("strided_ranks"):  # rank r of w takes samples r, r + w, ... in order
        data = Subset(data, range(trainer.global_rank, n, trainer.world_size))
    try:
        if role == "aggregator" and party.get("no_data"):
            trainer.fit(model)  # no datamodule, no loaders: the clients evaluate
            strategy.collect_client_tests(timeout=120)
        elif role == "aggregator":
            holdout = DataLoader(dataset(999, 128), batch_size=128)
            trainer.fit(model, val_dataloaders=holdout)
            trainer.test(model, dataloaders=holdout, verbose=False)
            if party.get("collect_tests"):  # evaluate_on_clients: their tests, merged
                strategy.collect_client_tests(timeout=120)
        else:
            val = party.get("val")  # (seed, n, shift) of a noisy validation set
            trainer.fit(
                model,
                train_dataloaders=DataLoader(data, batch_size=batch, shuffle=False),
                val_dataloaders=None if val is None else DataLoader(noisy_dataset(*val), 16),
            )
            test = party.get("test")  # (seed, n, shift): test the final model, federated
            if test is not None and strategy.final_report is not None:
                trainer.test(model, dataloaders=DataLoader(noisy_dataset(*test), 16), verbose=False)
                strategy.receive_test_report(timeout=120)
            if party.get("wait_test_report") and strategy.final_report is not None:
                strategy.receive_test_report(timeout=60)
    except Exception as exc:
        logging.getLogger("party").error("FAILED %s: %s", type(exc).__name__, exc)
        sys.exit(1)


def run_plain(root: str, epochs: int, party: dict[str, Any]) -> None:
    """Plain Lightning training (no federation), saving the final weights.

    ``epochs=-1`` with ``party["max_steps"]`` trains for a number of steps instead.
    """
    warnings.filterwarnings("ignore")
    from safetensors.torch import save_file

    L.seed_everything(party.get("seed", 0), verbose=False)
    trainer = L.Trainer(
        max_epochs=epochs,
        max_steps=party.get("max_steps", -1),
        default_root_dir=str(Path(root) / "plain"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
        deterministic=True,
        **party.get("trainer", {}),
    )
    model = TinyNet(party.get("lr", 0.1), party.get("momentum", 0.0), party.get("opts"))
    data = dataset(party.get("data_seed", 0), party.get("n", 64))
    loader = DataLoader(data, batch_size=party.get("batch_size", 16), shuffle=False)
    trainer.fit(model, train_dataloaders=loader)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(Path(root) / "plain.safetensors"),
    )


class _Script:
    """A party run as its own script (``python parties.py ARGS``), as DDP needs.

    Lightning starts a DDP party's other ranks by running the same command again; a
    process made by ``multiprocessing`` has no command to run again.
    """

    def __init__(self, args: list[Any]) -> None:
        import subprocess

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), json.dumps(args)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(Path(args[0]) / f"{args[1]}.stderr", "w"),  # noqa: SIM115
        )

    def join(self, timeout: float | None = None) -> None:
        import subprocess

        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()


class Federation:
    """Starts parties as processes in one folder and reads what they leave behind."""

    def __init__(self, root: Path, clients: list[str]) -> None:
        self.root = root
        self.clients = clients
        from lightning_fed.simulate import make_keys

        make_keys(root, "t", ["agg", *clients])
        self.procs: dict[str, Any] = {}

    def start(
        self,
        node: str,
        role: str,
        strategy: dict[str, Any],
        party: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> Any:
        args = (str(self.root), node, role, strategy, party or {})
        if strategy.get("strategy") == "ddp":  # its ranks are started as scripts
            script = _Script(list(args))
            self.procs[key or node] = script
            return script
        p = CTX.Process(target=run_party, args=args)
        p.start()
        self.procs[key or node] = p
        return p

    def wait(self, timeout: float = 240) -> dict[str, int | None]:
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            p.join(max(0.1, deadline - time.monotonic()))
        codes = {k: p.exitcode for k, p in self.procs.items()}
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        return codes

    def log(self, node: str) -> str:
        path = self.root / f"{node}.log"
        return path.read_text() if path.exists() else ""

    def report(self) -> dict[str, Any]:
        return json.loads((self.out("agg") / "report.json").read_text())

    def out(self, node: str) -> Path:
        return self.root / node / "fedavg" / "t" / node

    def startup_seconds(self, count: int) -> float:
        """How long ``count`` processes started together take to build their Trainers.

        Deadlines that must cover a party's start-up derive from this, so that a loaded
        machine lengthens them instead of failing the test.
        """
        started = time.monotonic()
        procs = [
            CTX.Process(
                target=run_party,
                args=(str(self.root), f"dry-{i}", "client", {}, {"dry_run": True}),
            )
            for i in range(count)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
        return time.monotonic() - started

    def wait_for_log(self, node: str, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(node):
            if time.monotonic() > deadline:
                raise AssertionError(f"{node} never logged {text!r}:\n{self.log(node)}")
            time.sleep(0.05)


def federations(tmp_path: Path) -> Iterator[Any]:
    """Yields ``make(*clients)`` -> :class:`Federation`; kills what is left at the end."""
    made: list[Federation] = []

    def make(*clients: str, folder: str | None = None) -> Federation:
        root = tmp_path if folder is None else tmp_path / folder
        root.mkdir(parents=True, exist_ok=True)
        f = Federation(root, list(clients))
        made.append(f)
        return f

    yield make
    for f in made:
        for p in f.procs.values():
            if p.is_alive():
                p.kill()


if __name__ == "__main__":  # a party as a script (DDP): python parties.py '[root, node, ...]'
    run_party(*json.loads(sys.argv[1]))
