"""FedAvg settings, validated up front (value, rule and hint in every error)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from lightning_fed.errors import SettingError
from lightning_fed.fedavg.selection import participants_per_round
from lightning_fed.privacy.dp_settings import DifferentialPrivacy, LocalDP
from lightning_fed.privacy.settings import SecureAggregation
from lightning_fed.validation import node_name, positive_int, seconds

Role = Literal["client", "aggregator"]


def resolve_role(role: str | None, is_initiator: bool | None) -> Role:
    """``role`` or the seed's ``is_initiator`` flag, as ``"client"`` or ``"aggregator"``."""
    if role is None and is_initiator is None:
        raise SettingError(
            "say which role this party plays: role='client' or role='aggregator' "
            "(or the seed's is_initiator=True for the aggregator)"
        )
    from_flag: Role | None = None
    if is_initiator is not None:
        from_flag = "aggregator" if is_initiator else "client"
    if role is not None and role not in ("client", "aggregator"):
        raise SettingError(f"role must be 'client' or 'aggregator', got {role!r}")
    if role is not None and from_flag is not None and role != from_flag:
        raise SettingError(
            f"role={role!r} contradicts is_initiator={is_initiator!r}; give only one of them"
        )
    return role if role is not None else from_flag  # type: ignore[return-value]


#: What a client does with its optimizers' state at a round's start.
OPTIMIZER_STATES = ("keep", "reset")


@dataclass(frozen=True)
class FedAvgConfig:
    """Every FedAvg knob (see :class:`~lightning_fed.FedAvgStrategy` for the meanings)."""

    role: Role
    clients: int | None = None
    rounds: int = 10
    local_epochs: int | None = None
    local_steps: int | None = None
    clients_per_round: int | float | None = None
    min_clients: int = 1
    calculation_timeout: float = 300.0
    schedule_timeout: float = 60.0
    log_rounds: int = 1
    recovery: bool = False
    local_keys: Sequence[str] = field(default_factory=tuple)
    seed: int = 0
    aggregator: str | None = None
    evaluate_on_clients: bool = False
    optimizer_state: str = "keep"
    secure_aggregation: SecureAggregation | None = None
    differential_privacy: DifferentialPrivacy | LocalDP | None = None

    def __post_init__(self) -> None:
        if self.clients is not None:
            positive_int("clients", self.clients)
        positive_int("rounds", self.rounds)
        if self.local_epochs is not None and self.local_steps is not None:
            raise SettingError(
                f"give local_epochs ({self.local_epochs!r}) or local_steps "
                f"({self.local_steps!r}), not both: a round is counted in one unit"
            )
        if self.local_epochs is not None:
            positive_int("local_epochs", self.local_epochs)
        if self.local_steps is not None:
            positive_int("local_steps", self.local_steps)
        positive_int("min_clients", self.min_clients)
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise SettingError(
                f"optimizer_state must be one of {', '.join(map(repr, OPTIMIZER_STATES))}, got "
                f"{self.optimizer_state!r}; hint: 'keep' carries the clients' optimizer state "
                "(momentum, Adam moments) across rounds, 'reset' starts each round afresh"
            )
        positive_int("log_rounds", self.log_rounds)
        if self.clients is not None and self.min_clients > self.clients:
            raise SettingError(
                f"min_clients={self.min_clients} exceeds clients={self.clients}; no round "
                "could ever succeed; hint: lower min_clients"
            )
        per = self.clients_per_round
        if isinstance(per, float) and per > 1 and per.is_integer():
            per = int(per)  # YAML/CLI parsers may hand a count over as 2.0
            object.__setattr__(self, "clients_per_round", per)
        if per is not None and not (
            (isinstance(per, int) and not isinstance(per, bool) and per >= 1)
            or (isinstance(per, float) and 0 < per <= 1)
        ):
            raise SettingError(
                f"clients_per_round must be an int >= 1, a fraction in (0, 1] or None (all), "
                f"got {per!r}"
            )
        if isinstance(per, int) and per < self.min_clients:
            raise SettingError(
                f"clients_per_round={per} is below min_clients={self.min_clients}, so every "
                "round would fail; hint: sample more clients or lower min_clients"
            )
        seconds("calculation_timeout", self.calculation_timeout)
        seconds("schedule_timeout", self.schedule_timeout)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SettingError(f"seed must be an int, got {self.seed!r}")
        if (
            isinstance(self.local_keys, str)
            or not isinstance(self.local_keys, Sequence)
            or not all(isinstance(k, str) for k in self.local_keys)
        ):
            raise SettingError(
                f"local_keys must be a list of glob patterns, got {self.local_keys!r}; "
                "hint: local_keys=['*running_mean', '*running_var']"
            )
        object.__setattr__(self, "local_keys", tuple(self.local_keys))
        if isinstance(per, float) and self.clients is not None:
            sampled = participants_per_round(per, self.clients)
            if sampled < self.min_clients:
                raise SettingError(
                    f"clients_per_round={per} samples {sampled} of clients={self.clients}, below "
                    f"min_clients={self.min_clients}, so every round would fail; hint: sample "
                    "a larger fraction or lower min_clients"
                )
        if self.aggregator is not None:
            node_name("aggregator node id", self.aggregator)
        if self.secure_aggregation is not None and not isinstance(
            self.secure_aggregation, SecureAggregation
        ):
            raise SettingError(
                "secure_aggregation must be None or a lightning_fed.privacy.SecureAggregation, "
                f"got {self.secure_aggregation!r}"
            )
        self._check_privacy()
        if not isinstance(self.evaluate_on_clients, bool):
            raise SettingError(
                f"evaluate_on_clients must be True or False, got {self.evaluate_on_clients!r}"
            )

    def _check_privacy(self) -> None:
        dp = self.differential_privacy
        if dp is None:
            return
        if not isinstance(dp, DifferentialPrivacy | LocalDP):
            raise SettingError(
                "differential_privacy must be None, a lightning_fed.privacy.DifferentialPrivacy "
                f"(aggregator) or a lightning_fed.privacy.LocalDP (client), got {dp!r}"
            )
        if self.role == "aggregator" and isinstance(dp, LocalDP):
            raise SettingError(
                f"{dp!r} is set on the aggregator, but local DP-SGD runs on each client's own "
                "data; hint: set it on the clients, or give the aggregator "
                "DifferentialPrivacy(...) for client-level DP of the global model"
            )
        if self.role == "client" and isinstance(dp, DifferentialPrivacy):
            raise SettingError(
                f"{dp!r} is set on a client, but the aggregator clips and noises the round "
                "(and tells the clients their share under secure aggregation); hint: set it on "
                "the aggregator, or give this client LocalDP(...) for DP-SGD on its own data"
            )

    @property
    def epochs_per_round(self) -> int:
        """Local epochs per round (1 unless given); unused when ``local_steps`` is set."""
        return 1 if self.local_epochs is None else self.local_epochs
