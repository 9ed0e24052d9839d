"""Exceptions raised by the channel.

Every error names what was wrong and, where it helps, what to do about it. They
all derive from :class:`ChannelError` so that callers can catch the family.
"""

from __future__ import annotations

from collections.abc import Collection

from lightning_fed.errors import LightningFedError


class ChannelError(LightningFedError):
    """Base class of every error raised by :mod:`lightning_fed.channel`."""


class InvalidNameError(ChannelError, ValueError):
    """A node id, task id, message kind or tensor name breaks the naming rules."""


class ConfigError(ChannelError, ValueError):
    """The task configuration or a key file is missing, malformed or inconsistent."""


class ChannelTimeoutError(ChannelError, TimeoutError):
    """A receive reached its deadline before what it awaited arrived.

    Attributes:
        awaited: a human-readable description of what was awaited.
        missing: the senders nothing (matching) arrived from.
        partial: messages that did arrive before the deadline (for ``gather``).
    """

    def __init__(
        self,
        awaited: str,
        missing: Collection[str],
        timeout: float,
        partial: dict[str, object] | None = None,
    ) -> None:
        self.awaited = awaited
        self.missing = sorted(missing)
        self.timeout = timeout
        self.partial = dict(partial or {})
        who = ", ".join(self.missing) if self.missing else "any sender"
        super().__init__(
            f"timed out after {timeout:g}s waiting for {awaited} from {who}; "
            "hint: check that those nodes are running and use the same channel URL and task id, "
            "or raise the timeout"
        )


class BlobIntegrityError(ChannelError):
    """A message's tensor blob is missing, truncated, corrupted or unreadable.

    The message itself was authentic (its signature verified) but the payload it
    references does not match the SHA-256 it promised, or cannot be decoded.
    """

    def __init__(self, sender: str, kind: str, seq: int, round: int, reason: str) -> None:
        self.sender = sender
        self.kind = kind
        self.seq = seq
        self.round = round
        self.reason = reason
        super().__init__(
            f"tensor blob of message {kind!r} (round {round}, seq {seq}) from {sender!r} is "
            f"unusable: {reason}; hint: the shared storage was modified or damaged after the "
            "sender published it, so ask the sender to send it again"
        )


class MessageTooLargeError(ChannelError, ValueError):
    """A message body exceeds the channel's limit for small JSON bodies."""


class StorageError(ChannelError):
    """The shared storage failed: unreachable, missing bucket, access denied, I/O error.

    Attributes:
        operation: what the channel was doing (``"publish"``, ``"list"``, ``"read"``...).
        key: the key or prefix it was working on.
        url: the storage URL.
    """

    def __init__(
        self, operation: str, key: str, url: str, cause: BaseException, hint: str | None = None
    ) -> None:
        self.operation = operation
        self.key = key
        self.url = url
        super().__init__(
            f"storage {url!r} failed to {operation} {key!r}: {type(cause).__name__}: {cause}; "
            "hint: "
            + (
                hint
                or "check that the storage is reachable, the bucket or folder exists and the "
                "credentials in storage_options allow reading and writing there; "
                f"`lightning-fed check {url}` tries each"
            )
        )
