"""What both roles' Lightning callbacks share (see :mod:`.aggregator_hooks` and
:mod:`.client_hooks`): where a party works, what its fit leaves for its strategy, and
which tensors are federated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_fed.algorithms import ModelSpec
from lightning_fed.algorithms.aggregate import TensorSpec
from lightning_fed.algorithms.base import EXTRA
from lightning_fed.channel import Channel, Message
from lightning_fed.fedavg.config import FedAvgConfig
from lightning_fed.fedavg.errors import FedAvgError
from lightning_fed.fedavg.selection import federated_names
from lightning_fed.trainer_access import callbacks_of

log = logging.getLogger(__name__)

RECOVERY_CHECKPOINT = "last-round.ckpt"


@dataclass
class Outcome:
    """What a party's fit leaves for its strategy to read (the hooks write only here).

    Attributes:
        final_report: the federation's report once ``fit`` ended.
        finished_as: client: ``(aggregator, instance)`` of the finish it received.
        test_report_due: aggregator: the client instances to send the final test's
            metrics to.
    """

    final_report: dict[str, Any] | None = None
    finished_as: tuple[str, str] | None = None
    test_report_due: dict[str, str] | None = field(default=None)
    test_sent: bool = False  # client: its test of the final model went to the aggregator
    left: str | None = None  # client: why it left the federation before the finish
    #: aggregator: clients' evaluations that came before their phase was collected
    early_evaluations: dict[str, list[Message]] = field(default_factory=dict)


@dataclass(frozen=True)
class Party:
    """Where a party's hooks work: its settings, channel and folders.

    ``channel`` is None on the ranks of a multi-process party other than global rank 0:
    only rank 0 talks to the other parties.
    """

    config: FedAvgConfig
    task_id: str
    node_id: str
    channel: Channel | None
    output_dir: Path
    state_dir: Path


class RoleHooks(Callback):
    """What both roles share: which tensors are federated, and their expected specs."""

    def __init__(self, party: Party, outcome: Outcome) -> None:
        self.party = party
        self.config = party.config
        self.node_id = party.node_id
        self.output_dir = party.output_dir
        self.outcome = outcome
        self.names: list[str] = []
        self.expected: dict[str, TensorSpec] = {}
        self.model = ModelSpec({}, frozenset())

    @property
    def channel(self) -> Channel:
        """The party's channel (global rank 0 only)."""
        if self.party.channel is None:
            raise FedAvgError(f"{self.node_id}: only global rank 0 talks to the channel")
        return self.party.channel

    def _describe_model(self, module: pl.LightningModule) -> None:
        state = module.state_dict()
        self.names = federated_names(state, self.config.local_keys)
        if not self.names:
            raise FedAvgError(
                f"local_keys={list(self.config.local_keys)} keeps every tensor of the model "
                "local, so there is nothing to federate; hint: narrow the patterns"
            )
        odd = [n for n in self.names if n.startswith(EXTRA)]
        if odd:
            raise FedAvgError(
                f"the model's state has tensors named {odd[:3]}; names starting with "
                f"{EXTRA!r} are reserved for algorithms' tensors; hint: rename the submodule"
            )
        self.model = ModelSpec.of(module, self.names)
        self.expected = dict(self.model.tensors)

    def detach(self, trainer: pl.Trainer) -> None:
        """Remove these hooks (and what they installed) from the trainer's callbacks."""
        if self in callbacks_of(trainer):
            callbacks_of(trainer).remove(self)
