"""Horizontal federated learning: FedAvg as a Lightning strategy.

The maths (:mod:`.aggregate`, :mod:`.selection`, :mod:`.partition`) are pure
functions; :mod:`.aggregator` and :mod:`.client` speak the round protocol over a
channel; :mod:`.strategy` plugs them into Lightning. See docs/fedavg.md.
"""

from lightning_fed.algorithms.aggregate import WeightedMean, update_problems, weighted_average
from lightning_fed.fedavg.errors import (
    FedAvgError,
    FederationAbortedError,
    RoundFailedError,
    SupersededError,
)
from lightning_fed.fedavg.partition import dirichlet_partition, iid_partition
from lightning_fed.fedavg.selection import BATCHNORM_STATS, sample_clients
from lightning_fed.fedavg.strategy import FedAvgStrategy

__all__ = [
    "BATCHNORM_STATS",
    "FedAvgError",
    "FedAvgStrategy",
    "FederationAbortedError",
    "RoundFailedError",
    "SupersededError",
    "WeightedMean",
    "dirichlet_partition",
    "iid_partition",
    "sample_clients",
    "update_problems",
    "weighted_average",
]
