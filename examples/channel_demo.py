"""A two-process demonstration of the channel (what `make demo` runs until FedAvg lands).

A coordinator and a data owner ("hospital-a") run as separate processes and talk
only through a shared local directory:

1. the coordinator sends a small MLP's weights; the data owner trains them for one
   epoch on its own rows of scikit-learn's bundled digits and sends them back with its
   sample count; the coordinator measures accuracy on rows it holds out (3 rounds);
2. someone with write access to the storage forges a message in the data owner's
   name: the coordinator rejects it and says why;
3. the task's storage is inspected, then removed.

Every figure printed is measured in this run.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lightning_fed.channel import Channel, NodeIdentity, TaskConfig, inspect_task
from lightning_fed.channel.envelope import Envelope, seal

TASK_ID = "channel-demo"
ROUNDS = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def digits_split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Scikit-learn's digits: the first 1,400 rows for the data owner, the rest held out."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xt, yt = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    return (xt[:1400], yt[:1400]), (xt[1400:], yt[1400:])


def open_channel(url: str, keydir: Path, node: str) -> Channel:
    task = TaskConfig.load(keydir / "task.json")
    return Channel(url, task, NodeIdentity.load(keydir / f"{node}.key"), timeout=120).connect()


def data_owner(url: str, keydir: str) -> None:
    """The data owner's process: train what arrives on local rows, send it back."""
    ch = open_channel(url, Path(keydir), "hospital-a")
    (x, y), _ = digits_split()
    model = make_model()
    ch.send("ready", {"samples": len(x)}, to="coordinator")
    for r in range(1, ROUNDS + 1):
        msg = ch.receive("weights", sender="coordinator", round=r)
        model.load_state_dict(msg.tensors)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        total = 0.0
        for i in range(0, len(x), 32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            loss.backward()
            opt.step()
            total += loss.item() * len(x[i : i + 32])
        ch.send(
            "update",
            {"samples": len(x), "train_loss": total / len(x)},
            to="coordinator",
            round=r,
            tensors=model.state_dict(),
        )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="  [log] %(message)s")
    with tempfile.TemporaryDirectory(prefix="lightning-fed-demo-") as tmp:
        root = Path(tmp)
        keydir, url = root / "keys", (root / "storage").as_uri()
        publics = [NodeIdentity.generate(n).save(keydir)[1] for n in ("coordinator", "hospital-a")]
        TaskConfig.from_public_key_files(TASK_ID, publics).save(keydir / "task.json")  # type: ignore[arg-type]
        print(f"shared storage: {url}\nkeys and task configuration: {keydir}")

        owner = mp.get_context("spawn").Process(target=data_owner, args=(url, str(keydir)))
        owner.start()
        ch = open_channel(url, keydir, "coordinator")
        _, (xv, yv) = digits_split()
        ready = ch.receive("ready", sender="hospital-a")
        print(f"hospital-a is up with {ready.body['samples']} private rows")
        model = make_model()
        print(f"round 0: held-out accuracy {accuracy(model, xv, yv):.3f} (untrained)")
        for r in range(1, ROUNDS + 1):
            t0 = time.perf_counter()
            ch.send("weights", {}, to="hospital-a", round=r, tensors=model.state_dict())
            reply = ch.receive("update", sender="hospital-a", round=r)
            model.load_state_dict(reply.tensors)
            print(
                f"round {r}: hospital-a trained on {reply.body['samples']} rows "
                f"(train loss {reply.body['train_loss']:.3f}); held-out accuracy "
                f"{accuracy(model, xv, yv):.3f}; round trip {time.perf_counter() - t0:.2f} s"
            )
            ch.prune_sent()
        owner.join(60)
        if owner.exitcode != 0:
            raise SystemExit(f"the data owner's process failed (exit code {owner.exitcode})")

        print("a forged 'update' in hospital-a's name, signed with someone else's key:")
        forger = NodeIdentity("hospital-a", NodeIdentity.generate("mallory").private_key)
        fake = Envelope(
            TASK_ID,
            "hospital-a",
            "coordinator",
            "update",
            ROUNDS + 1,
            time.time_ns() // 1000,
            time.time(),
            {"samples": 10**9},
        )
        ch.store.publish(
            f"{TASK_ID}/inbox/coordinator/hospital-a/{fake.seq:020d}-update.msg", seal(fake, forger)
        )
        delivered = ch.poll("update")
        print(f"  delivered: {len(delivered)}; rejected: {ch.rejections[-1].reason}")

        print("storage now:\n" + "\n".join(inspect_task(url, TASK_ID).lines()))
        ch.destroy_task()
        print(f"removed task {TASK_ID!r}; everything above ran for real in two processes")


if __name__ == "__main__":
    main()
