"""Validation of every name that becomes part of a storage path.

Task ids, node ids and message kinds are joined into object keys and file paths,
so they must never contain a path separator, a parent reference, control
characters or empty parts. Tensor names only live inside safetensors headers and
follow a looser rule.
"""

from __future__ import annotations

import re

from lightning_fed.channel.errors import InvalidNameError

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_NAME_RULE = (
    "1 to 128 characters from A-Z a-z 0-9 '_' '-' '.', starting with a letter or digit, "
    "not ending with '.' and never containing '..'"
)
#: Names Windows reserves for devices, whatever the case and extension ("nul.txt" too):
#: Windows hosts, SMB shares and some object-store gateways cannot store them.
_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{device}{i}" for device in ("COM", "LPT") for i in range(10)]
)
_MAX_TENSOR_NAME = 1024


def validate_name(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a safe storage name, else raise :class:`InvalidNameError`.

    Args:
        value: the candidate name (node id, task id, message kind).
        what: what the name is, for the error message (``"node id"``...).

    Raises:
        InvalidNameError: naming the value, the rule and how to fix it.
    """
    if not isinstance(value, str):
        raise InvalidNameError(f"{what} must be a string, got {type(value).__name__} {value!r}")
    if not _SAFE_NAME.fullmatch(value) or ".." in value or value.endswith("."):
        why = ""
        if value.endswith(".") or value.endswith(" "):
            why = " (Windows and SMB shares drop a trailing dot or space, so it would collide "
            why += f"with {value.rstrip('. ')!r})"
        raise InvalidNameError(
            f"invalid {what} {value!r}: it must be {_NAME_RULE}{why}; "
            "hint: use something like 'hospital-a' or 'round.update'"
        )
    if value.split(".")[0].upper() in _RESERVED:
        raise InvalidNameError(
            f"invalid {what} {value!r}: {value.split('.')[0]!r} is a device name that Windows "
            "reserves in every folder (CON, PRN, AUX, NUL, COM0-9, LPT0-9, with any extension), "
            "so Windows hosts and SMB shares cannot store it; hint: use something like "
            f"'{value.split('.')[0].lower()}-node'"
        )
    return value


def validate_tensor_name(value: object) -> str:
    """Return ``value`` if it can name a tensor in a message, else raise.

    Tensor names never reach the filesystem (they are keys inside one safetensors
    blob), so dots and slashes of ``state_dict`` keys are fine; empty names, control
    characters and over-long names are not.
    """
    if not isinstance(value, str):
        raise InvalidNameError(
            f"tensor name must be a string, got {type(value).__name__} {value!r}"
        )
    if not value or len(value) > _MAX_TENSOR_NAME or not value.isprintable():
        raise InvalidNameError(
            f"invalid tensor name {value!r}: it must be 1 to {_MAX_TENSOR_NAME} printable "
            "characters with no control characters; hint: use the module's state_dict keys"
        )
    return value
