"""Messages and named tensors between federated nodes over shared fsspec storage.

The channel knows nothing about federated learning. A node opens its task's
channel, sends signed messages (a kind, a round, a small JSON body and optional
named tensors) to one, several or every peer, and receives messages filtered by
kind, sender and round, always with a deadline::

    from lightning_fed.channel import Channel, NodeIdentity, TaskConfig

    task = TaskConfig.load("task.json")
    me = NodeIdentity.load("keys/hospital-a.key")
    with Channel("s3://bucket/federation", task, me) as ch:
        ch.send("update", {"n": 512}, to="coordinator", round=3, tensors=model.state_dict())
        msg = ch.receive("weights", sender="coordinator", round=4, timeout=600)

See docs/channel.md for the storage layout, guarantees and security properties.
"""

from lightning_fed.channel.channel import Channel, Message, Rejection, Traffic
from lightning_fed.channel.envelope import MAX_BODY_BYTES
from lightning_fed.channel.errors import (
    BlobIntegrityError,
    ChannelError,
    ChannelTimeoutError,
    ConfigError,
    InvalidNameError,
    MessageTooLargeError,
    StorageError,
)
from lightning_fed.channel.keys import NodeIdentity, TaskConfig
from lightning_fed.channel.maintenance import check_storage, inspect_task, remove_task
from lightning_fed.channel.names import validate_name
from lightning_fed.channel.store import Store

__all__ = [
    "MAX_BODY_BYTES",
    "BlobIntegrityError",
    "Channel",
    "ChannelError",
    "ChannelTimeoutError",
    "ConfigError",
    "InvalidNameError",
    "Message",
    "MessageTooLargeError",
    "NodeIdentity",
    "Rejection",
    "StorageError",
    "Store",
    "TaskConfig",
    "Traffic",
    "check_storage",
    "inspect_task",
    "remove_task",
    "validate_name",
]
