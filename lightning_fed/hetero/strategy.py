"""``HeteroNNStrategy``: run a HeteroNN party with an ordinary Lightning Trainer.

At the start of ``fit`` (and of ``validate``/``test`` if ``fit`` did not run first
in this process) the strategy opens the channel, aligns the party's
:class:`~lightning_fed.hetero.data.HeteroDataModule` by private set intersection
with the other parties, and connects the
:class:`~lightning_fed.hetero.module.HeteroNNModule` to the per-batch exchange.
The host's Trainer decides the epochs and when to stop; a collaborator's follows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from typing_extensions import override

from lightning_fed.channel import Channel
from lightning_fed.channel.credentials import load_credentials
from lightning_fed.hetero.data import HeteroDataModule
from lightning_fed.hetero.link import CollaboratorLink, HeteroError, HostLink, _Link
from lightning_fed.hetero.module import HeteroNNModule
from lightning_fed.hetero.psi import private_intersection

log = logging.getLogger(__name__)


class HeteroNNStrategy(SingleDeviceStrategy):
    """Split learning across a host and its collaborators, for both roles.

    Example::

        # the host: labels, its own columns, the inference model
        trainer = L.Trainer(max_epochs=10, strategy=HeteroNNStrategy(
            url, task_id="t", node_id="bank", role="host", collaborators=["shop"]))
        # a collaborator: its own columns
        trainer = L.Trainer(strategy=HeteroNNStrategy(
            url, task_id="t", node_id="shop", role="collaborator", host="bank"))
        trainer.fit(model, datamodule=data)   # on every party

    Args:
        channel: the shared storage URL (or a connected :class:`Channel`).
        task_id: the task's id (the same on every party).
        node_id: this party's node id.
        role: ``"host"`` or ``"collaborator"``.
        host: a collaborator's host node id.
        collaborators: the host's collaborator node ids.
        keys: folder of ``task.json`` and ``<node_id>.key``.
        task_config: ``task.json`` when it is not in ``keys``.
        key_file: this node's private key when it is not in ``keys``.
        storage_options: fsspec options for the URL.
        calculation_timeout: seconds to wait for any one message of a batch.
        schedule_timeout: seconds for the alignment (handshake and intersection).
        psi_workers: processes that blind IDs (default: the machine's cores).
    """

    strategy_name = "heteronn"

    def __init__(
        self,
        channel: str | Channel,
        task_id: str | None = None,
        node_id: str | None = None,
        role: str = "collaborator",
        *,
        host: str | None = None,
        collaborators: Sequence[str] | None = None,
        keys: str | os.PathLike[str] = "keys",
        task_config: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        calculation_timeout: float = 300.0,
        schedule_timeout: float = 600.0,
        psi_workers: int | None = None,
    ) -> None:
        super().__init__(device="cpu")
        self.parallel_devices: list[torch.device] | None = None  # set by the Trainer
        if role not in ("host", "collaborator"):
            raise ValueError(f"role must be 'host' or 'collaborator', got {role!r}")
        if role == "host" and not collaborators:
            raise ValueError("the host needs collaborators=[...]: the other parties' node ids")
        if role == "collaborator" and not host:
            raise ValueError("a collaborator needs host=...: the host's node id")
        for name, value in (
            ("calculation_timeout", calculation_timeout),
            ("schedule_timeout", schedule_timeout),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value < float("inf")
            ):
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        if isinstance(channel, Channel):
            task_id, node_id = channel.task.task_id, channel.node_id
        elif not task_id or not node_id:
            raise ValueError("task_id and node_id are required with a channel URL")
        self._channel_arg = channel
        self.task_id, self.node_id, self.role = task_id, node_id, role
        self.host = node_id if role == "host" else host
        self.collaborators = list(collaborators or [])
        self.keys = Path(keys)
        self.task_config_path = Path(task_config) if task_config else self.keys / "task.json"
        self.key_path = Path(key_file) if key_file else self.keys / f"{node_id}.key"
        self.storage_options = dict(storage_options or {})
        self.calculation_timeout = float(calculation_timeout)
        self.schedule_timeout = float(schedule_timeout)
        self.psi_workers = psi_workers
        self._channel: Channel | None = None
        self._session: str | None = None

    @property
    @override
    def root_device(self) -> torch.device:
        return self.parallel_devices[0] if self.parallel_devices else torch.device("cpu")

    def _open_channel(self) -> Channel:
        if self._channel is None:
            if isinstance(self._channel_arg, Channel):
                channel = self._channel_arg
            else:
                task, identity = load_credentials(
                    self.task_id, self.node_id, self.task_config_path, self.key_path, self.keys
                )
                channel = Channel(
                    self._channel_arg, task, identity, storage_options=self.storage_options
                )
            self._channel = channel.connect()
        return self._channel

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        module, data = self.lightning_module, getattr(trainer, "datamodule", None)
        if not isinstance(module, HeteroNNModule):
            raise HeteroError(
                f"HeteroNNStrategy trains a HeteroNNModule, got {type(module).__name__}"
            )
        if not isinstance(data, HeteroDataModule):
            raise HeteroError(
                "HeteroNNStrategy needs trainer.fit(model, datamodule=<a HeteroDataModule>), "
                f"got {type(data).__name__}; hint: subclass lightning_fed.hetero.HeteroDataModule"
            )
        if trainer.accumulate_grad_batches != 1:
            raise HeteroError(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}: HeteroNN exchanges "
                "gradients batch by batch; hint: use a larger batch_size instead"
            )
        trainer.num_sanity_val_steps = 0  # every party runs the same evaluation loops
        if self.role == "collaborator":
            trainer.fit_loop.max_epochs = -1  # the host decides
            trainer.fit_loop.min_epochs = 0
        channel = self._open_channel()
        if self._session is None or data.train_ids is None:
            self._align(channel, data)
        assert self._session is not None
        if self.role == "host":
            link: HostLink | CollaboratorLink = HostLink(
                channel,
                self.collaborators,
                module.feature_key,
                self._session,
                self.calculation_timeout,
            )
        else:
            assert self.host is not None
            link = CollaboratorLink(
                channel, self.host, module.feature_key, self._session, self.calculation_timeout
            )
        module.connect(link)

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Tell the other parties this one stopped, so that none waits for its timeout."""
        super().on_exception(exception)
        if self._channel is None or self._session is None:
            return
        peers = self.collaborators if self.role == "host" else [self.host or ""]
        link = _Link(self._channel, self._session, self.calculation_timeout)
        try:
            link.abort([p for p in peers if p], f"{type(exception).__name__}: {exception}")
        except Exception as exc:  # never hide the original failure
            log.warning("%s: could not tell the others about the failure: %s", self.node_id, exc)

    def _align(self, channel: Channel, data: HeteroDataModule) -> None:
        assert self.host is not None
        result = private_intersection(
            channel,
            list(data.local_ids()),
            host=self.host,
            collaborators=self.collaborators if self.role == "host" else None,
            timeout=self.schedule_timeout,
            workers=self.psi_workers,
        )
        if not result.ids:
            raise HeteroError(
                f"the parties share no IDs (this party has {len(data.local_ids())}); hint: "
                "check that every party encodes its IDs the same way"
            )
        data.align(result.ids)
        self._session = result.session
        log.info(
            "%s %s: %d common IDs (%d train, %d test)",
            self.role,
            self.node_id,
            len(result.ids),
            len(data.train_ids or []),
            len(data.test_ids or []),
        )
