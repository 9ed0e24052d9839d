"""What every party shares, whatever its role: where it meets the others and who it is.

- :class:`Endpoint`: the channel URL (or a :class:`~lightning_fed.channel.Channel`),
  the task and node ids and the key files, checked where they enter.
- :func:`check_channel_url`: refuses local paths that look like mistyped URLs.
- :class:`Presence`: one live process per node id (a restart after a crash is fine).
- :class:`PartyStrategy`: what every party's Lightning strategy shares (identity,
  folders, channel, claim on the node id); :class:`OneDevice`: one process, one device.
"""

from lightning_fed.node.endpoint import Endpoint, check_channel_url
from lightning_fed.node.party import OneDevice, PartyStrategy, party_dir
from lightning_fed.node.presence import NodeBusyError, Presence

__all__ = [
    "Endpoint",
    "NodeBusyError",
    "OneDevice",
    "PartyStrategy",
    "Presence",
    "check_channel_url",
    "party_dir",
]
