"""Deadline-bounded exponential backoff for polling shared storage."""

from __future__ import annotations

import time


class Backoff:
    """Sleep intervals that start at ``initial`` and grow by ``factor`` up to ``maximum``.

    Args:
        initial: the first interval, in seconds (milliseconds are typical).
        maximum: the cap, in seconds (well under a second).
        deadline_in: seconds from now after which :meth:`sleep` returns False.
        factor: growth per sleep.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        deadline_in: float = float("inf"),
        factor: float = 1.5,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(
                f"polling intervals must satisfy 0 < initial <= maximum, got initial={initial!r} "
                f"maximum={maximum!r}"
            )
        if factor < 1:
            raise ValueError(f"backoff factor must be >= 1, got {factor!r}")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.deadline = time.monotonic() + deadline_in
        self.interval = initial

    def reset(self) -> None:
        """Go back to the shortest interval (something arrived)."""
        self.interval = self.initial

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - time.monotonic())

    def sleep(self) -> bool:
        """Sleep for the next interval, cut short at the deadline.

        Returns:
            False, without sleeping, once the deadline has passed; True otherwise.
        """
        left = self.remaining()
        if left <= 0:
            return False
        time.sleep(min(self.interval, left))
        self.interval = min(self.interval * self.factor, self.maximum)
        return True
