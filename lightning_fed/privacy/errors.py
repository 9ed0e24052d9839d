"""The privacy package's errors."""

from __future__ import annotations

from lightning_fed.errors import LightningFedError


class PrivacyError(LightningFedError):
    """Secure aggregation or differential privacy cannot go on (the message says why)."""


class SecAggError(PrivacyError):
    """A secure-aggregation round cannot produce a correct sum: too many dropouts, or a
    peer sent a share, key or masked vector that does not fit."""
