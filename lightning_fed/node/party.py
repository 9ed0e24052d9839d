"""What a party's Lightning strategy is, whichever family it federates in.

:class:`PartyStrategy` is the one place for what :class:`~lightning_fed.FedAvgStrategy`
and :class:`~lightning_fed.hetero.HeteroNNStrategy` share: who the party is (the
channel URL or a :class:`~lightning_fed.channel.Channel`, task and node ids, keys and
storage credentials, all checked at construction), where it works (its output and
state folders), its connection to the others (the channel, opened once) and its claim
that it is the only live process of its node id. :class:`OneDevice` is the rule of a
party that trains in one process on one device. Each family adds its protocol.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import Strategy
from typing_extensions import override

from lightning_fed.channel import Channel, Traffic
from lightning_fed.node.endpoint import Endpoint
from lightning_fed.node.presence import Presence

log = logging.getLogger(__name__)


def party_dir(root_dir: str | os.PathLike[str], family: str, task_id: str, node_id: str) -> Path:
    """A party's default output folder: ``<root_dir>/<family>/<task_id>/<node_id>``."""
    return Path(root_dir) / family / task_id / node_id


class PartyStrategy(Strategy):
    """The part of a Lightning strategy that makes it one party of a federated task.

    A mixin: a family's strategy derives from it and from the Lightning strategy it
    trains with (e.g. ``SingleDeviceStrategy``), and calls :meth:`_init_party` from its
    ``__init__``, then ``super().teardown()`` releases what the party held.
    """

    #: The family's folder under ``default_root_dir`` (``"fedavg"``, ``"heteronn"``).
    family: ClassVar[str] = ""
    #: Whether the channel stays open from one Trainer call to the next (``fit`` then
    #: ``test``): a family whose session and traffic counts span them keeps it.
    keeps_channel: ClassVar[bool] = False

    def _init_party(
        self,
        channel: str | Channel,
        task_id: str | None,
        node_id: str | None,
        *,
        keys: str | os.PathLike[str],
        task_config: str | os.PathLike[str] | None,
        key_file: str | os.PathLike[str] | None,
        storage_options: Mapping[str, Any] | None,
        state_dir: str | os.PathLike[str] | None,
        output_dir: str | os.PathLike[str] | None,
    ) -> None:
        """Who the party is and where it works; checks every value, touches nothing."""
        self.endpoint = Endpoint.resolve(
            channel,
            task_id,
            node_id,
            keys=keys,
            task_config=task_config,
            key_file=key_file,
            storage_options=storage_options,
        )
        self.task_id, self.node_id = self.endpoint.task_id, self.endpoint.node_id
        self._state_dir_setting = Path(state_dir) if state_dir is not None else None
        self._output_dir_setting = Path(output_dir) if output_dir is not None else None
        self._channel: Channel | None = None
        self._presence: Presence | None = None
        self._traffic = Traffic()  # what a closed channel had moved

    # -- where the party works -------------------------------------------------------
    def party_dir(self, trainer: pl.Trainer) -> Path:
        """``<default_root_dir>/<family>/<task_id>/<node_id>``."""
        return party_dir(trainer.default_root_dir, self.family, self.task_id, self.node_id)

    def output_dir(self, trainer: pl.Trainer) -> Path:
        """Where this party writes its outputs (final weights, ``report.json``)."""
        return self._output_dir_setting or self.party_dir(trainer)

    def state_dir(self, trainer: pl.Trainer) -> Path:
        """Where this party keeps what a restart needs (recovery checkpoints, journal)."""
        return self._state_dir_setting or self.party_dir(trainer) / "state"

    # -- the party's connection and its claim on the node id ----------------------------
    def _connect_channel(self, **options: Any) -> Channel:
        """Open this party's channel (``options`` go to :meth:`Endpoint.make_channel`)."""
        channel = self.endpoint.make_channel(**options).connect()
        self._channel = channel
        return channel

    @property
    def traffic(self) -> Traffic:
        """What this party's channel has moved so far (messages and bytes, sent and
        received, tensor blobs included), also after the run closed it."""
        return self._channel.traffic.copy() if self._channel is not None else self._traffic.copy()

    def _claim_node(self, channel: Channel) -> None:
        """Make sure no other live process runs this node id (see :class:`Presence`).

        Raises:
            NodeBusyError: another live process holds it; its message names that one.
        """
        if self._presence is None:
            presence = Presence(channel)
            presence.acquire()
            self._presence = presence

    def _release_party(self, close_channel: bool = True) -> None:
        """Give up the node id and close the channel (idempotent)."""
        if self._presence is not None:
            self._presence.release()
            self._presence = None
        if close_channel and self._channel is not None:
            self._traffic = self._channel.traffic.copy()
            self._channel.close()
            self._channel = None

    @override
    def teardown(self) -> None:
        self._release_party(close_channel=not self.keeps_channel)
        super().teardown()


class OneDevice(Strategy):
    """A mixin for a party that trains in one process on one device.

    The Trainer's accelerator sets ``parallel_devices``; more than one is refused
    before training with :meth:`_too_many_devices`'s error.
    """

    parallel_devices: list[torch.device] | None = None  # set by the Trainer

    @property
    @override
    def root_device(self) -> torch.device:
        return self.parallel_devices[0] if self.parallel_devices else torch.device("cpu")

    def _too_many_devices(self, count: int) -> Exception:  # pragma: no cover - overridden
        """The error for ``Trainer(devices=count)``: what is wrong and what to do."""
        raise NotImplementedError

    @override
    def setup_environment(self) -> None:
        if self.parallel_devices and len(self.parallel_devices) > 1:
            raise self._too_many_devices(len(self.parallel_devices))
        super().setup_environment()
