"""Federated algorithms through one seam (see :mod:`.base` and docs/algorithms.md).

Pick one on the aggregator; clients learn it from the round message::

    from lightning_fed.algorithms import FedAdam, FedProx, Scaffold

    FedAvgStrategy(url, task_id="t", node_id="agg", role="aggregator", rounds=50,
                   algorithm=FedProx(mu=0.01))

From LightningCLI YAML::

    algorithm:
      class_path: lightning_fed.algorithms.FedAdam
      init_args: {lr: 0.01}
"""

from lightning_fed.algorithms.aggregate import TensorSpec, WeightedMean
from lightning_fed.algorithms.base import (
    EXTRA,
    Algorithm,
    AlgorithmError,
    ClientAlgorithm,
    ClientRound,
    ClientUpdate,
    ModelSpec,
    RoundAggregate,
    Statistic,
    algorithm_from,
    known_algorithms,
)
from lightning_fed.algorithms.fedadagrad import FedAdagrad
from lightning_fed.algorithms.fedadam import FedAdam
from lightning_fed.algorithms.fedavg import FedAvg
from lightning_fed.algorithms.fedavgm import FedAvgM
from lightning_fed.algorithms.fedopt import AdaptiveServerOptimizer, ServerOptimizer
from lightning_fed.algorithms.fedprox import FedProx
from lightning_fed.algorithms.fedyogi import FedYogi
from lightning_fed.algorithms.krum import Krum
from lightning_fed.algorithms.median import Median
from lightning_fed.algorithms.scaffold import Scaffold
from lightning_fed.algorithms.spool import SpooledStatistic, UpdateSpool
from lightning_fed.algorithms.trimmed_mean import TrimmedMean

__all__ = [
    "EXTRA",
    "AdaptiveServerOptimizer",
    "Algorithm",
    "AlgorithmError",
    "ClientAlgorithm",
    "ClientRound",
    "ClientUpdate",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Krum",
    "Median",
    "ModelSpec",
    "RoundAggregate",
    "Scaffold",
    "ServerOptimizer",
    "SpooledStatistic",
    "Statistic",
    "TensorSpec",
    "TrimmedMean",
    "UpdateSpool",
    "WeightedMean",
    "algorithm_from",
    "known_algorithms",
]
