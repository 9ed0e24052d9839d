"""Vertical federated learning (HeteroNN): sample alignment and split learning.

- :mod:`.psi` aligns the parties' samples by private set intersection;
- :mod:`.order` gives every party the same split and batch order of the common IDs;
- :class:`HeteroDataModule` serves a party's samples in that order;
- :class:`HeteroNNModule` is a party's model, :class:`HeteroNNStrategy` runs it.
"""

from lightning_fed.hetero.data import HeteroBatch, HeteroDataModule
from lightning_fed.hetero.link import HeteroError
from lightning_fed.hetero.module import HeteroNNModule
from lightning_fed.hetero.strategy import HeteroNNStrategy

__all__ = ["HeteroBatch", "HeteroDataModule", "HeteroError", "HeteroNNModule", "HeteroNNStrategy"]
