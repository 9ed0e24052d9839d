"""The package's error family: catch :class:`LightningFedError` to catch every one of ours.

Each error's message names the value, the rule it breaks and what to do. The
families below it: :class:`SettingError` (a setting is wrong; raised where it
enters, before anything runs), ``ChannelError`` (storage, keys, messages),
``FedAvgError`` and ``HeteroError`` (a federation cannot go on).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_raised: ContextVar[list[SettingError] | None] = ContextVar("setting_errors", default=None)


class LightningFedError(Exception):
    """Base class of every error lightning_fed raises on purpose."""


class SettingError(LightningFedError, ValueError):
    """A setting breaks its rule: its message gives the value, the rule and a hint.

    Raised by constructors (``FedAvgStrategy(...)``, ``HeteroNNStrategy(...)``...)
    before any file, folder or storage is touched, so a corrected retry starts clean.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        raised = _raised.get()
        if raised is not None:
            raised.append(self)


@contextmanager
def setting_errors() -> Iterator[list[SettingError]]:
    """Collect every :class:`SettingError` raised inside the block, even if wrapped.

    A config parser may catch the error and raise its own with the message inside
    (jsonargparse does for ``Trainer(strategy=...)``, a union type); the collected
    error lets the caller show the one line that matters.
    """
    raised: list[SettingError] = []
    token = _raised.set(raised)
    try:
        yield raised
    finally:
        _raised.reset(token)
