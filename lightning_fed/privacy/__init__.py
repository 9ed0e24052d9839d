"""Private FedAvg: secure aggregation (SecAgg+) and, later in this package, differential
privacy with accounting. See docs/privacy.md for the threat model of each mode."""

from lightning_fed.privacy.errors import PrivacyError, SecAggError
from lightning_fed.privacy.settings import SecureAggregation

__all__ = ["PrivacyError", "SecAggError", "SecureAggregation"]
