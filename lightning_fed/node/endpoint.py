"""A party's endpoint: the channel it uses and the identity it uses it with.

Both strategies take the same arguments for this (``channel``, ``task_id``,
``node_id``, ``keys``, ``task_config``, ``key_file``, ``storage_options``);
:meth:`Endpoint.resolve` checks them all at construction, before anything is read
or written, and :meth:`Endpoint.open` makes the connected channel at ``fit``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_fed.channel import Channel, ConfigError
from lightning_fed.channel.credentials import load_credentials
from lightning_fed.channel.store import check_url
from lightning_fed.errors import SettingError
from lightning_fed.validation import node_name


def check_channel_url(url: object) -> str:
    """``url`` if it can name the shared storage, else a :class:`SettingError`.

    See :func:`lightning_fed.channel.store.check_url`: a local path whose first part
    looks like a URL scheme (``s3:/bucket/fl``) is refused with the URL it meant.
    """
    try:
        return check_url(url)
    except ConfigError as exc:
        raise SettingError(str(exc)) from None


def _path_setting(name: str, value: object) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise SettingError(f"{name} must be a path, got {value!r}")
    return Path(value)


@dataclass(frozen=True)
class Endpoint:
    """The storage and the identity of one party, checked (see :meth:`resolve`).

    Attributes:
        channel: the storage URL, or a :class:`Channel` made by the caller.
        task_id: the federation's id.
        node_id: this party's node id.
        keys: the folder of ``task.json`` and ``<node_id>.key``.
        task_config: the task configuration's path.
        key_file: this node's private key's path.
        storage_options: fsspec options for the URL.
    """

    channel: str | Channel
    task_id: str
    node_id: str
    keys: Path
    task_config: Path
    key_file: Path
    storage_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def resolve(
        cls,
        channel: str | Channel,
        task_id: str | None,
        node_id: str | None,
        *,
        keys: str | os.PathLike[str] = "keys",
        task_config: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Endpoint:
        """Check every argument; the ids become part of storage keys and file names.

        Raises:
            SettingError: naming the value, the rule and a hint.
        """
        if isinstance(channel, Channel):
            for name, value, actual in (
                ("task_id", task_id, channel.task.task_id),
                ("node_id", node_id, channel.node_id),
            ):
                if value is not None and value != actual:
                    raise SettingError(f"{name}={value!r} differs from the channel's {actual!r}")
            task_id, node_id = channel.task.task_id, channel.node_id
        else:
            check_channel_url(channel)
            if not task_id or not node_id:
                raise SettingError(
                    "task_id and node_id are required with a channel URL, got "
                    f"task_id={task_id!r}, node_id={node_id!r}"
                )
        node_name("task id", task_id)
        node_name("node id", node_id)
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise SettingError(
                f"storage_options must be a mapping of fsspec options, got {storage_options!r}; "
                "hint: storage_options={'key': ..., 'secret': ..., 'client_kwargs': "
                "{'endpoint_url': ...}}"
            )
        folder = _path_setting("keys", keys) or Path("keys")
        return cls(
            channel=channel,
            task_id=task_id,
            node_id=node_id,
            keys=folder,
            task_config=_path_setting("task_config", task_config) or folder / "task.json",
            key_file=_path_setting("key_file", key_file) or folder / f"{node_id}.key",
            storage_options=dict(storage_options or {}),
        )

    @property
    def url(self) -> str:
        """The storage URL."""
        return self.channel.url if isinstance(self.channel, Channel) else self.channel

    def make_channel(self, **channel_options: Any) -> Channel:
        """The channel (not yet connected): the caller's, or one made from the key files.

        Args:
            channel_options: passed to :class:`Channel` when one is made (``state_dir``,
                ``max_blob_bytes``...).

        Raises:
            ConfigError: a key file is missing or belongs to another task.
        """
        if isinstance(self.channel, Channel):
            return self.channel
        task, identity = load_credentials(
            self.task_id, self.node_id, self.task_config, self.key_file, self.keys
        )
        return Channel(
            self.channel,
            task,
            identity,
            storage_options=self.storage_options,
            **channel_options,
        )


def _register_with_jsonargparse() -> None:
    """Make ``channel: str | Channel`` a plain string to LightningCLI's parser.

    LightningCLI turns on jsonargparse's fsspec config reading, and a parameter whose
    type includes a class lets jsonargparse try every string given for it as a path to
    a sub-config, so ``channel: s3://bucket/fl`` was opened with the ambient AWS
    credentials (and failed without them). Registered, a :class:`Channel` is a leaf
    type that configs cannot build, and the URL stays a string.
    """
    try:
        from jsonargparse.typing import register_type
    except ImportError:  # pragma: no cover - jsonargparse is a dependency
        return

    def refuse(value: object) -> Channel:
        raise ValueError(f"a Channel cannot be built from a config value ({value!r})")

    register_type(Channel, serializer=lambda ch: ch.url, deserializer=refuse)


_register_with_jsonargparse()
