"""The privacy spent so far, from Opacus' accountants (Rényi DP or PRV).

A run is a composition of subsampled Gaussian mechanisms: every round (central DP)
or optimizer step (DP-SGD) applies noise multiplier ``z`` to a sample drawn with
rate ``q``. :class:`Accountant` keeps that history as ``(z, q, steps)`` entries, in
the form Opacus' accountants keep it, and asks the library for epsilon at a delta;
the history is plain numbers, so it is checkpointed with the run and a restarted
party carries on counting.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

#: Accountants a user may choose (Opacus' names).
ACCOUNTANTS = ("rdp", "prv")


def require_opacus(module: str = "opacus") -> Any:
    """Import an Opacus module (the accountants, DP-SGD's pieces).

    Raises:
        ImportError: Opacus is not installed; the message says how to install it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - opacus comes with the privacy extra
        raise ImportError(
            f"differential privacy needs opacus ({exc}); hint: pip install 'lightning-fed[privacy]'"
        ) from exc


class Accountant:
    """Epsilon spent by a sequence of subsampled Gaussian mechanisms.

    Args:
        kind: ``"rdp"`` (Rényi DP, Mironov 2017; Opacus' default) or ``"prv"``
            (privacy random variables, Gopi et al. 2021; tighter, slower).
        history: ``(noise_multiplier, sample_rate, steps)`` entries to start from.
    """

    def __init__(self, kind: str = "rdp", history: Iterable[Sequence[float]] = ()) -> None:
        if kind not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {kind!r}")
        self.kind = kind
        self.history: list[tuple[float, float, int]] = []
        for entry in history:
            z, q, n = entry
            self.step(float(z), float(q), int(n))

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` mechanisms of multiplier ``noise_multiplier``, rate ``sample_rate``."""
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps!r}")
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            z, q, n = self.history[-1]
            self.history[-1] = (z, q, n + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))

    @property
    def steps(self) -> int:
        """Mechanisms recorded so far."""
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step; inf if any step had no noise)."""
        if not self.history:
            return 0.0
        if any(z == 0 for z, _, _ in self.history):
            return math.inf
        accountant = require_opacus("opacus.accountants").create_accountant(self.kind)
        accountant.history = list(self.history)
        with warnings.catch_warnings():  # "optimal order is the largest alpha": a valid bound
            warnings.simplefilter("ignore", UserWarning)
            return float(accountant.get_epsilon(delta=delta))

    def epsilon_after(
        self, delta: float, noise_multiplier: float, sample_rate: float, steps: int = 1
    ) -> float:
        """Epsilon spent if ``steps`` more mechanisms ran (for stopping before a target)."""
        ahead = Accountant(self.kind, self.history)
        ahead.step(noise_multiplier, sample_rate, steps)
        return ahead.epsilon(delta)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "history": [list(e) for e in self.history]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Accountant:
        return cls(str(state.get("kind", "rdp")), state.get("history", []))


def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "rdp"
) -> float:
    """The smallest noise multiplier (to Opacus' tolerance of 0.01 in epsilon) that spends
    at most ``target_epsilon`` in ``steps`` mechanisms at rate ``sample_rate``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(
            require_opacus("opacus.accountants.utils").get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=kind,
            )
        )
