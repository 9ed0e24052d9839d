"""A party's samples, keyed by ID, served in the order every party shares.

Subclass :class:`HeteroDataModule` and write two methods: :meth:`~HeteroDataModule.local_ids`
(the IDs this party holds) and :meth:`~HeteroDataModule.get_item` (one sample's
tensors: features on a collaborator, ``(features, label)`` on the host). Once the
common IDs are known (:meth:`~HeteroDataModule.align`, after the private set
intersection), the module splits them with :meth:`~HeteroDataModule.split_dataset`
(the seed's hook; a seeded split by default) and serves batches as
:class:`HeteroBatch` objects: the batch's IDs and its collated tensors. Training
batches follow :func:`~lightning_fed.hetero.order.epoch_order`, reshuffled each
epoch (Lightning calls ``set_epoch`` on the sampler), so every party iterates
the same IDs in the same order; evaluation batches follow the canonical order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from typing_extensions import override

from lightning_fed.hetero.order import batch_digest, batches, canonical, epoch_order, split_ids
from lightning_fed.hetero.psi.ecdh import IdLike, check_unique, encode_id


@dataclass
class HeteroBatch:
    """One batch: its IDs (the same on every party) and this party's collated data."""

    ids: list[IdLike]
    data: Any

    @property
    def digest(self) -> str:
        """The digest of the batch's IDs that parties compare before combining tensors."""
        return batch_digest(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


class EpochOrder(Sampler[int]):
    """Positions into ``ids`` in :func:`epoch_order` for the current epoch.

    Lightning calls :meth:`set_epoch` on a DataLoader's sampler at the start of every
    training epoch; the DataLoader cuts the order into consecutive batches.
    """

    def __init__(self, ids: Sequence[IdLike], seed: int) -> None:
        self.ids = list(ids)
        self.seed = seed
        self.epoch = 0
        self._position = {encode_id(i): n for n, i in enumerate(self.ids)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        for i in epoch_order(self.ids, self.epoch, self.seed):
            yield self._position[encode_id(i)]

    def __len__(self) -> int:
        return len(self.ids)


class _ById(Dataset[tuple[IdLike, Any]]):
    def __init__(self, module: HeteroDataModule, ids: Sequence[IdLike]) -> None:
        self.module, self.ids = module, list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, position: int) -> tuple[IdLike, Any]:
        key = self.ids[position]
        return key, self.module.get_item(key)


def collate(items: list[tuple[IdLike, Any]]) -> HeteroBatch:
    """A :class:`HeteroBatch` of ``(id, sample)`` pairs (samples collated as usual)."""
    return HeteroBatch([k for k, _ in items], default_collate([s for _, s in items]))


class HeteroDataModule(pl.LightningDataModule):
    """Base class of a HeteroNN party's data.

    Args:
        batch_size: samples per batch; must be the same on every party.
        test_fraction: share of the common IDs the default :meth:`split_dataset`
            holds out for validation and testing.
        seed: seeds the split and the per-epoch order; the same on every party.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self, batch_size: int = 128, test_fraction: float = 0.2, seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__()
        batches([], batch_size)  # validates batch_size now
        self.batch_size = batch_size
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_ids: list[IdLike] | None = None
        self.test_ids: list[IdLike] | None = None

    # -- what the user writes ----------------------------------------------------------
    def local_ids(self) -> Sequence[IdLike]:
        """Every ID this party holds (str, int or bytes, each once)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement local_ids(): the IDs of this party's samples"
        )

    def get_item(self, id: IdLike) -> Any:
        """The tensors of one sample: features on a collaborator, (features, label) on the host."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement get_item(id): one sample's tensors"
        )

    def split_dataset(self, ids: Sequence[IdLike]) -> tuple[list[IdLike], list[IdLike]]:
        """Split the common IDs into ``(train, test)``; the same on every party.

        The default holds out ``test_fraction`` of them by a seeded hash
        (:func:`~lightning_fed.hetero.order.split_ids`). An override must be a pure
        function of ``ids`` (in canonical order) so that every party agrees.
        """
        return split_ids(ids, self.test_fraction, self.seed)

    # -- what the framework calls --------------------------------------------------------
    def align(
        self, common_ids: Sequence[IdLike], local_ids: Sequence[IdLike] | None = None
    ) -> None:
        """Adopt the IDs every party holds and split them.

        ``local_ids`` spares a second call of :meth:`local_ids` when the caller has them.

        Raises:
            ValueError: an ID is not one of :meth:`local_ids`, or appears twice, or the
                split does not partition the common IDs.
        """
        check_unique(common_ids)
        local = {encode_id(i) for i in (self.local_ids() if local_ids is None else local_ids)}
        stray = [i for i in common_ids if encode_id(i) not in local]
        if stray:
            raise ValueError(
                f"{len(stray)} aligned ID(s) are not among this party's local_ids(), e.g. "
                f"{stray[0]!r}; hint: align() takes the intersection computed from local_ids()"
            )
        pool = canonical(common_ids)
        train, test = self.split_dataset(pool)
        train, test = canonical(train), canonical(test)
        if sorted(map(encode_id, train + test)) != sorted(map(encode_id, pool)):
            raise ValueError(
                f"split_dataset() must put each of the {len(pool)} common IDs in exactly one of "
                f"(train, test); got {len(train)} + {len(test)}"
            )
        self.train_ids, self.test_ids = train, test

    def _ids(self, which: str) -> list[IdLike]:
        ids = self.train_ids if which == "train" else self.test_ids
        if ids is None:
            raise RuntimeError(
                f"{type(self).__name__} has no {which} IDs yet: the common IDs come from the "
                "private set intersection; hint: call align(common_ids) first"
            )
        return ids

    def _loader(self, ids: list[IdLike], sampler: Sampler[int] | None) -> DataLoader[Any]:
        return DataLoader(
            _ById(self, ids),
            batch_size=self.batch_size,
            sampler=sampler,  # None: the canonical order the IDs are in
            shuffle=False,
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        ids = self._ids("train")
        return self._loader(ids, EpochOrder(ids, self.seed))

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(self._ids("test"), None)

    @override
    def test_dataloader(self) -> DataLoader[Any]:
        return self.val_dataloader()
