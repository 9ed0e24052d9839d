"""``HeteroNNStrategy``: run a HeteroNN party with an ordinary Lightning Trainer.

At the start of ``fit`` (and of ``validate``/``test`` if ``fit`` did not run first
in this process) the strategy opens the channel, aligns the party's
:class:`~lightning_fed.hetero.data.HeteroDataModule` by private set intersection
with the other parties, and connects the
:class:`~lightning_fed.hetero.module.HeteroNNModule` to the per-batch exchange.
The host's Trainer decides the epochs, the validation schedule and when to stop;
a collaborator's follows. With ``recovery=True`` every party checkpoints each
completed epoch, and a restart of all parties resumes after the last epoch whose
checkpoint every party holds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_fed.channel import Channel
from lightning_fed.errors import SettingError
from lightning_fed.hetero.data import HeteroDataModule
from lightning_fed.hetero.hooks import HeteroHooks
from lightning_fed.hetero.link import CollaboratorLink, HeteroError, HostLink, Link, Offer
from lightning_fed.hetero.module import HeteroNNModule
from lightning_fed.hetero.psi import private_intersection
from lightning_fed.hetero.recovery import checkpoint_path, ids_digest, saved_epochs
from lightning_fed.node import NodeBusyError, OneDevice, PartyStrategy
from lightning_fed.trainer_access import callbacks_of, restore_during_setup
from lightning_fed.validation import node_name, positive_int, seconds

log = logging.getLogger(__name__)

#: First and (on a local folder) longest pause while waiting for a batch's message.
POLL_FIRST, POLL_MAX_LOCAL = 0.0005, 0.002


class HeteroNNStrategy(PartyStrategy, OneDevice, SingleDeviceStrategy):
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
        log_rounds: host: validate (and log validation metrics) every ``log_rounds``
            epochs, as the seed's ``log_rounds``; None keeps the Trainer's
            ``check_val_every_n_epoch``. Collaborators follow the host's schedule.
        recovery: checkpoint every completed epoch in ``state_dir`` and, when all
            parties restart with recovery on, resume after the last epoch whose
            checkpoint every party holds.
        state_dir: where recovery checkpoints live (default:
            ``<default_root_dir>/heteronn/<task_id>/<node_id>/state``).
        output_dir: where ``report.json`` goes (default: that folder's parent).
        poll_interval: the longest pause, in seconds, between looks at the storage
            while waiting for another party's message. Default: 2 ms on a local
            folder (a look costs microseconds there, and every batch waits twice),
            the channel's default on object stores (each look is a billed request).
    """

    strategy_name = "heteronn"
    family = "heteronn"
    keeps_channel = True  # the session and its traffic span fit and test

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
        log_rounds: int | None = None,
        recovery: bool = False,
        state_dir: str | os.PathLike[str] | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        poll_interval: float | None = None,
    ) -> None:
        super().__init__(device="cpu")
        if role not in ("host", "collaborator"):
            raise SettingError(f"role must be 'host' or 'collaborator', got {role!r}")
        if role == "host" and not collaborators:
            raise SettingError("the host needs collaborators=[...]: the other parties' node ids")
        if role == "collaborator" and not host:
            raise SettingError("a collaborator needs host=...: the host's node id")
        self.calculation_timeout = seconds("calculation_timeout", calculation_timeout)
        self.schedule_timeout = seconds("schedule_timeout", schedule_timeout)
        if log_rounds is not None:
            positive_int("log_rounds", log_rounds)
            if role != "host":
                raise SettingError(
                    f"log_rounds={log_rounds} is the host's setting; a collaborator follows the "
                    "host's validation schedule; hint: leave it out on collaborators"
                )
        self._init_party(
            channel,
            task_id,
            node_id,
            keys=keys,
            task_config=task_config,
            key_file=key_file,
            storage_options=storage_options,
            state_dir=state_dir,
            output_dir=output_dir,
        )
        self.role = role
        self.host = self.node_id if role == "host" else node_name("host node id", host)
        if isinstance(collaborators, str):
            raise SettingError(
                f"collaborators must be a list of node ids, got the string {collaborators!r}; "
                f"hint: collaborators=[{collaborators!r}]"
            )
        self.collaborators = [node_name("collaborator node id", c) for c in collaborators or []]
        if len(set(self.collaborators)) != len(self.collaborators) or (
            self.node_id in self.collaborators
        ):
            raise SettingError(
                f"collaborators={self.collaborators} must be distinct node ids other than the "
                f"host's {self.node_id!r}; hint: list each collaborator once"
            )
        self.psi_workers = psi_workers
        self.poll_interval = (
            None if poll_interval is None else seconds("poll_interval", poll_interval)
        )
        self.log_rounds = log_rounds
        self.recovery = bool(recovery)
        self._session: str | None = None
        self._alignment: dict[str, Any] = {}
        self._hooks: HeteroHooks | None = None

    @property
    def report(self) -> dict[str, Any] | None:
        """This party's report so far (alignment, epochs, metrics, traffic), if it ran."""
        return None if self._hooks is None else self._hooks.report()

    @override
    def _too_many_devices(self, count: int) -> Exception:
        return HeteroError(
            f"a HeteroNN party runs in one process on one device, got {count} devices: every "
            "batch is one exchange with the other parties, which DDP's ranks would each "
            "repeat; hint: Trainer(devices=1) (a bigger batch_size uses a bigger device)"
        )

    def _open_channel(self) -> Channel:
        if self._channel is None:
            self._connect_channel()
        assert self._channel is not None
        if self._presence is None:  # one live process per node id
            self._claim_node(self._channel)
            if self.poll_interval is not None:
                self._channel.set_polling(min(POLL_FIRST, self.poll_interval), self.poll_interval)
            elif self._channel.store.local:
                self._channel.set_polling(POLL_FIRST, POLL_MAX_LOCAL)
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
        elif self.log_rounds is not None:
            trainer.check_val_every_n_epoch = self.log_rounds
        channel = self._open_channel()
        if self._session is None or data.train_ids is None:
            self._align(channel, data)
        assert self._session is not None and data.train_ids is not None
        link = self._link(channel, module)
        self._install_hooks(trainer, link, data)
        if trainer.state.fn == TrainerFn.FITTING:
            self._agree_and_resume(trainer, link, data)
        link.handshake(data.batch_size)
        module.connect(link)

    def _link(self, channel: Channel, module: HeteroNNModule) -> HostLink | CollaboratorLink:
        assert self._session is not None and self.host is not None
        return module.make_link(
            channel,
            role=self.role,
            host=self.host,
            collaborators=self.collaborators,
            session=self._session,
            timeout=self.calculation_timeout,
        )

    def _install_hooks(
        self, trainer: pl.Trainer, link: HostLink | CollaboratorLink, data: HeteroDataModule
    ) -> HeteroHooks:
        callbacks = callbacks_of(trainer)
        if self._hooks is not None and self._hooks in callbacks:
            self._hooks.link = link  # test after fit: the same report goes on
            return self._hooks
        assert data.train_ids is not None and data.test_ids is not None
        self._hooks = HeteroHooks(
            link,
            task_id=self.task_id,
            ids_digest=ids_digest([*data.train_ids, *data.test_ids]),
            state_dir=self.state_dir(trainer) if self.recovery else None,
            output_dir=self.output_dir(trainer),
            alignment=self._alignment,
        )
        callbacks.append(self._hooks)
        return self._hooks

    def _agree_and_resume(
        self, trainer: pl.Trainer, link: HostLink | CollaboratorLink, data: HeteroDataModule
    ) -> None:
        """Exchange offers and the plan; restore the agreed checkpoint, if any."""
        assert data.train_ids is not None and data.test_ids is not None
        state_dir = self.state_dir(trainer)
        offer = Offer(
            batch_size=data.batch_size,
            train_size=len(data.train_ids),
            test_size=len(data.test_ids),
            checkpoints=saved_epochs(state_dir) if self.recovery else [],
        )
        if isinstance(link, HostLink):
            plan = link.plan(offer, trainer.check_val_every_n_epoch)
        else:
            plan = link.plan(offer)
            trainer.check_val_every_n_epoch = plan.check_val_every_n_epoch
        if plan.resume_epoch is None:
            return
        path = checkpoint_path(state_dir, plan.resume_epoch)
        restore_during_setup(trainer, path)
        log.warning(
            "%s %s: recovered from %s; resuming after epoch %d",
            self.role,
            self.node_id,
            path,
            plan.resume_epoch,
        )

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Tell the other parties this one stopped, so that none waits for its timeout."""
        super().on_exception(exception)
        if self._channel is None or self._session is None or isinstance(exception, NodeBusyError):
            return
        peers = self.collaborators if self.role == "host" else [self.host or ""]
        link = Link(self._channel, self._session, self.calculation_timeout)
        try:
            link.abort([p for p in peers if p], f"{type(exception).__name__}: {exception}")
        except Exception as exc:  # never hide the original failure
            log.warning("%s: could not tell the others about the failure: %s", self.node_id, exc)

    def _align(self, channel: Channel, data: HeteroDataModule) -> None:
        assert self.host is not None
        local = list(data.local_ids())  # may read a large index: once
        result = private_intersection(
            channel,
            local,
            host=self.host,
            collaborators=self.collaborators if self.role == "host" else None,
            timeout=self.schedule_timeout,
            workers=self.psi_workers,
        )
        if not result.ids:
            raise HeteroError(
                f"the parties share no IDs (this party has {len(local)}); hint: "
                "check that every party encodes its IDs the same way"
            )
        data.align(result.ids, local_ids=local)
        self._session = result.session
        self._alignment = {
            "local_ids": len(local),
            "common_ids": len(result.ids),
            "train_ids": len(data.train_ids or []),
            "test_ids": len(data.test_ids or []),
            "psi_seconds": result.seconds,
        }
        log.info(
            "%s %s: %d common IDs (%d train, %d test)",
            self.role,
            self.node_id,
            len(result.ids),
            len(data.train_ids or []),
            len(data.test_ids or []),
        )
