"""What a party says by default, in Lightning's own style, and how long waits are shown.

Lightning prints its info lines (``rank_zero_info``) without any logging set up;
lightning_fed does the same: until the application configures logging (a handler on
the root logger), INFO lines of the ``lightning_fed`` loggers go to stderr as plain
messages. Once it does, they reach its handlers instead, and nothing is shown twice.
"""

from __future__ import annotations

import logging
import time

#: Seconds between two "still waiting" lines of one wait.
NOTICE_EVERY = 30.0


class _UntilConfigured(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to stderr only while the root logger has no handler of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def install_default_handler() -> None:
    """Show lightning_fed's INFO lines by default (idempotent)."""
    logger = logging.getLogger("lightning_fed")
    if any(isinstance(h, _UntilConfigured) for h in logger.handlers):
        return
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    handler = _UntilConfigured()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)


class WaitNotice:
    """Says what a party waits for and how long it may still wait, every so often.

    Example::

        notice = WaitNotice(log, "client c1: waiting for the aggregator's next instruction",
                            deadline)
        while ...:
            msg = channel.receive(..., timeout=notice.slice())  # wakes up for the notice
            ...

    Args:
        log: the logger to say it with (INFO).
        what: what is awaited, from whom.
        deadline: the ``time.monotonic()`` at which the wait gives up.
        every: seconds between two lines (default :data:`NOTICE_EVERY`); the first comes
            after ``every`` seconds too, so a wait that ends quickly says nothing.
    """

    def __init__(
        self, log: logging.Logger, what: str, deadline: float, every: float | None = None
    ) -> None:
        self.log, self.what, self.deadline = log, what, deadline
        self.every = NOTICE_EVERY if every is None else every
        self._next = time.monotonic() + self.every

    def left(self) -> float:
        """Seconds until the deadline (may be negative)."""
        return self.deadline - time.monotonic()

    def slice(self) -> float:
        """How long to block before looking again: until the next notice or the deadline."""
        self.tick()
        return max(0.001, min(self.left(), self._next - time.monotonic()))

    def tick(self) -> None:
        """Log the notice if it is due."""
        now = time.monotonic()
        if now >= self._next and self.left() > 0:
            self.log.info("%s (up to %.0f s more)", self.what, self.left())
            self._next = now + self.every
