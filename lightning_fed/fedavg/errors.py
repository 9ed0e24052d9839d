"""Errors of the FedAvg layer; each message names what failed and what to do."""

from __future__ import annotations

from lightning_fed.errors import LightningFedError


class FedAvgError(LightningFedError, RuntimeError):
    """The federation cannot go on (a failed round, an abort, a misconfiguration)."""


class RoundFailedError(FedAvgError):
    """Too few clients delivered a usable update before ``calculation_timeout``."""


class FederationAbortedError(FedAvgError):
    """The aggregator stopped the federation and told this client why."""


class SupersededError(FedAvgError):
    """Another process checked in with this node id; this one must stop."""


class RoundAbandonedError(FedAvgError):
    """The aggregator went on without this client's part of a secure round (its next
    instruction is kept for :meth:`~lightning_fed.fedavg.client.ClientRole.next_instruction`)."""
