"""Recovery checkpoints of a HeteroNN party: one Lightning checkpoint per completed epoch.

Every party saves ``epoch-<n>.ckpt`` in its ``state_dir`` when epoch ``n`` ends and
keeps the last :data:`KEEP` of them. The host saves before it tells the
collaborators to go on, and a collaborator saves before it waits for that word, so
after any crash the parties' latest checkpoints differ by at most one epoch: the
last epoch whose checkpoint every party holds is always among the kept ones. When
all parties restart with recovery on, the host picks that epoch and every party
resumes after it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl

from lightning_fed.hetero.order import batch_digest, canonical
from lightning_fed.hetero.psi.ecdh import IdLike
from lightning_fed.outputs import temporary_sibling

#: Checkpoints kept per party: the last two epochs (see the module docstring).
KEEP = 2
_NAME = re.compile(r"^epoch-(\d{6,})\.ckpt$")


def checkpoint_path(state_dir: str | os.PathLike[str], epoch: int) -> Path:
    """Where a party keeps the checkpoint of completed epoch ``epoch`` (0-based)."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return Path(state_dir) / f"epoch-{epoch:06d}.ckpt"


def saved_epochs(state_dir: str | os.PathLike[str]) -> list[int]:
    """The epochs with a checkpoint in ``state_dir``, ascending (none if it is missing)."""
    folder = Path(state_dir)
    if not folder.is_dir():
        return []
    found = (_NAME.match(p.name) for p in folder.iterdir() if p.is_file())
    return sorted(int(m.group(1)) for m in found if m)


def save_epoch(trainer: pl.Trainer, state_dir: str | os.PathLike[str], epoch: int) -> Path:
    """Checkpoint the trainer as of the end of ``epoch`` (atomically); keep the last KEEP."""
    path = checkpoint_path(state_dir, epoch)
    tmp = temporary_sibling(path)  # creates the folder
    trainer.save_checkpoint(tmp)
    os.replace(tmp, path)
    for old in saved_epochs(state_dir)[:-KEEP]:
        checkpoint_path(state_dir, old).unlink(missing_ok=True)
    return path


def ids_digest(ids: Sequence[IdLike]) -> str:
    """A digest of the common IDs, which a checkpoint must share with the run it resumes."""
    return batch_digest(canonical(ids))
