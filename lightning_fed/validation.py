"""Checks of user settings shared by both strategies: the value, the rule and a hint."""

from __future__ import annotations

import math

from lightning_fed.channel.errors import ChannelError
from lightning_fed.channel.names import validate_name
from lightning_fed.errors import SettingError


def positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` if it is an int >= ``minimum``, else a ValueError that names the setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def seconds(name: str, value: object) -> float:
    """``value`` as float if it is a finite number of seconds > 0, else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise SettingError(
            f"{name} must be a finite number of seconds > 0, got {value!r}; every wait in a "
            "federation has a deadline"
        )
    return float(value)


def node_name(what: str, value: object) -> str:
    """``value`` if it is a safe id (see :func:`~lightning_fed.channel.validate_name`).

    Raises:
        SettingError: naming the value, the rule and a hint.
    """
    try:
        return validate_name(value, what)
    except ChannelError as exc:
        raise SettingError(str(exc)) from None
