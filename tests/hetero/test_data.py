"""HeteroDataModule: the same split and the same batches, epoch by epoch, on every party."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as L
import pytest
import torch

from lightning_fed.hetero.data import HeteroBatch, HeteroDataModule
from lightning_fed.hetero.order import batch_digest, batches, epoch_order


class Party(HeteroDataModule):
    """IDs lo..hi-1 with a feature vector each (and a label on the host)."""

    def __init__(self, lo: int, hi: int, host: bool, **kw: Any) -> None:
        super().__init__(**kw)
        self.lo, self.hi, self.host = lo, hi, host

    def local_ids(self) -> list[str]:
        ids = [f"u{i}" for i in range(self.lo, self.hi)]
        random.Random(self.lo).shuffle(ids)  # every party lists its IDs its own way
        return ids

    def get_item(self, id: Any) -> Any:
        n = int(id[1:])
        x = torch.full((3,), float(n) + (0.5 if self.host else 0.25))
        return (x, torch.tensor(n % 2)) if self.host else x


def pair(**kw: Any) -> tuple[Party, Party]:
    host, collab = Party(0, 900, True, **kw), Party(100, 1000, False, **kw)
    common = sorted(set(host.local_ids()) & set(collab.local_ids()))
    host.align(common)
    collab.align(list(reversed(common)))
    return host, collab


def ids_of(loader: Any, epoch: int | None = None) -> list[list[Any]]:
    if epoch is not None:
        loader.sampler.set_epoch(epoch)
    return [batch.ids for batch in loader]


def test_both_parties_split_and_batch_the_common_ids_identically() -> None:
    host, collab = pair(batch_size=64, test_fraction=0.25, seed=3)
    assert host.train_ids == collab.train_ids and host.test_ids == collab.test_ids
    assert len(host.test_ids) == 200 and len(host.train_ids) == 600
    h_train, c_train = host.train_dataloader(), collab.train_dataloader()
    seen = []
    for epoch in range(3):
        h, c = ids_of(h_train, epoch), ids_of(c_train, epoch)
        assert h == c == batches(epoch_order(host.train_ids, epoch, 3), 64)
        seen.append(h)
    assert seen[0] != seen[1] != seen[2]
    assert ids_of(host.val_dataloader()) == ids_of(collab.val_dataloader())
    assert ids_of(host.val_dataloader())[0] == host.test_ids[:64]


def test_batches_carry_their_ids_data_and_digest() -> None:
    host, collab = pair(batch_size=8)
    hb: HeteroBatch = next(iter(host.train_dataloader()))
    cb: HeteroBatch = next(iter(collab.train_dataloader()))
    assert hb.ids == cb.ids and hb.digest == cb.digest == batch_digest(hb.ids) and len(hb) == 8
    x, y = hb.data
    assert x.shape == (8, 3) and y.shape == (8,)
    assert [int(v) for v in x[:, 0]] == [int(i[1:]) for i in hb.ids]  # rows match IDs
    assert cb.data.shape == (8, 3)


class Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.seen: list[list[list[Any]]] = []

    def on_train_epoch_start(self) -> None:
        self.seen.append([])

    def training_step(self, batch: HeteroBatch, idx: int) -> torch.Tensor:
        self.seen[-1].append(batch.ids)
        x, y = batch.data
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.log("loss", loss)  # Lightning infers the batch size from the HeteroBatch
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_real_trainer_reshuffles_every_epoch_in_the_shared_order() -> None:
    host, _ = pair(batch_size=100, seed=1)
    model = Recorder()
    trainer = L.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=host)
    assert host.train_ids is not None
    assert model.seen == [batches(epoch_order(host.train_ids, e, 1), 100) for e in range(3)]


def test_misuse_is_explained() -> None:
    host = Party(0, 10, True)
    with pytest.raises(RuntimeError, match="call align"):
        host.train_dataloader()
    with pytest.raises(ValueError, match="not among this party's local_ids"):
        host.align(["u3", "u77"])
    with pytest.raises(ValueError, match="appears more than once"):
        host.align(["u3", "u3"])

    class BadSplit(Party):
        def split_dataset(self, ids: Any) -> Any:
            return list(ids), list(ids)[:1]

    with pytest.raises(ValueError, match="exactly one of"):
        BadSplit(0, 10, True).align(["u1", "u2"])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        Party(0, 10, True, batch_size=0)

    class Bare(HeteroDataModule):
        pass

    with pytest.raises(NotImplementedError, match="must implement local_ids"):
        Bare().local_ids()
