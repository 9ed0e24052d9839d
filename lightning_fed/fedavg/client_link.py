"""A client's talk with the aggregator as every process of the party sees it.

Only global rank 0 holds a :class:`~lightning_fed.fedavg.client.ClientRole` (and a
channel); the other ranks of a DDP client learn each instruction, with its weights,
from rank 0 (see :mod:`lightning_fed.ranks`). With one process this is the role itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

import torch

from lightning_fed.fedavg import protocol as P
from lightning_fed.fedavg.client import ClientRole, Instruction
from lightning_fed.ranks import Ranks

T = TypeVar("T")


class ClientLink:
    """The calls :class:`~lightning_fed.fedavg.client_hooks.ClientHooks` makes, on every rank.

    Each method is a collective: every rank of the party calls it at the same point.
    Whatever rank 0's role raises (an abort, a timeout) is raised on every rank.

    Args:
        role: rank 0's role; None on the other ranks.
        ranks: the party's processes.
    """

    def __init__(self, role: ClientRole | None, ranks: Ranks) -> None:
        if (role is None) == ranks.is_zero:
            raise ValueError("rank 0, and only rank 0, holds the client's role")
        self._role = role
        self.ranks = ranks
        self.aggregator: str | None = None
        self.instance = ""
        self.current: Instruction | None = None

    @property
    def role(self) -> ClientRole:
        """Rank 0's role (the channel, its sequence of messages)."""
        if self._role is None:
            raise RuntimeError(f"rank {self.ranks.rank} has no channel; only rank 0 talks")
        return self._role

    def check_in(self) -> None:
        """Rank 0 checks in with the aggregator; every rank learns who answered."""
        self.aggregator, self.instance = self.ranks.from_zero(self._check_in)

    def _check_in(self) -> tuple[str | None, str]:
        self.role.check_in()
        return self.role.aggregator, self.role.instance

    def next_instruction(self) -> Instruction:
        """The aggregator's next round or finish, with its weights, on every rank."""
        head = self.ranks.from_zero(self._next_head)
        tensors = self.ranks.tensors(self.role.current.tensors if self.ranks.is_zero else None)  # type: ignore[union-attr]
        instruction = replace(head, tensors=tensors)
        self.current = instruction
        return instruction

    def _next_head(self) -> Instruction:
        instruction = self.role.next_instruction()
        self.aggregator = self.role.aggregator
        return replace(instruction, tensors={})  # the weights go as tensors, not pickled

    def upload(
        self,
        tensors: Mapping[str, torch.Tensor],
        num_samples: int,
        metrics: Mapping[str, float],
        evaluation: dict[str, Any] | None = None,
    ) -> None:
        """Rank 0 sends this round's update (every rank holds the same synchronised model)."""
        self.ranks.from_zero(lambda: self.role.upload(tensors, num_samples, metrics, evaluation))

    def on_zero(self, work: Callable[[ClientRole], T]) -> T:
        """Rank 0 does ``work`` with its role (a secure round's steps); every rank gets
        its result, or what it raised."""
        return self.ranks.from_zero(lambda: work(self.role))

    def send_evaluation(
        self,
        evaluation: dict[str, Any],
        tensors: Mapping[str, torch.Tensor],
        phase: str = "validate",
    ) -> None:
        """Rank 0 sends the party's evaluation of the final model."""
        self.ranks.from_zero(lambda: self.role.send_evaluation(evaluation, tensors, phase))

    def receive_report(self, timeout: float) -> P.Report | None:
        """The aggregator's report of its final test, on every rank."""
        return self.ranks.from_zero(lambda: self.role.receive_report(timeout))

    def report_failure(self, reason: str, left: bool = False) -> None:
        """Rank 0 tells the aggregator that this client stopped (not a collective)."""
        if self._role is not None:
            self._role.report_failure(reason, left)
