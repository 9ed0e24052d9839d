"""Private FedAvg: secure aggregation (SecAgg+) and differential privacy with accounting
(central or distributed DP-FedAvg on the aggregator, local DP-SGD through Opacus on a
client). See docs/privacy.md for the threat model of each mode."""

from lightning_fed.privacy.accounting import Accountant, noise_multiplier_for
from lightning_fed.privacy.dp_settings import AdaptiveClipping, DifferentialPrivacy, LocalDP
from lightning_fed.privacy.errors import PrivacyError, SecAggError
from lightning_fed.privacy.settings import SecureAggregation

__all__ = [
    "Accountant",
    "AdaptiveClipping",
    "DifferentialPrivacy",
    "LocalDP",
    "PrivacyError",
    "SecAggError",
    "SecureAggregation",
    "noise_multiplier_for",
]
