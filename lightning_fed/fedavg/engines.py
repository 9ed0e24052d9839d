"""Where a FedAvg party trains: one device, or one process per device (DDP).

``FedAvgStrategy(..., strategy=None | "ddp")`` builds one of these: each is
:class:`~lightning_fed.fedavg.strategy.FedAvgStrategy` over the Lightning strategy of
that name, so the Trainer sets it up (devices, processes, process group) as its own.
The federation's side (the channel, the rounds) lives in ``FedAvgStrategy``; rank 0
talks, the other ranks follow (:mod:`lightning_fed.ranks`).

Lightning's process launcher for DDP kills every process of a party, without a word,
as soon as one rank exits with an error; :class:`_ReportingLauncher` first has rank 0
tell the federation which rank failed and why (a client tells the aggregator, the
aggregator aborts its clients).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from typing_extensions import override

from lightning_fed.errors import SettingError
from lightning_fed.fedavg.config import FedAvgConfig
from lightning_fed.fedavg.errors import FedAvgError
from lightning_fed.fedavg.strategy import FedAvgStrategy
from lightning_fed.node import OneDevice
from lightning_fed.ranks import peer_reason

log = logging.getLogger(__name__)

#: The values of ``FedAvgStrategy(strategy=...)``.
ENGINES = (None, "ddp")


def engine_class(name: str | None) -> type[FedAvgStrategy]:
    """The ``FedAvgStrategy`` subclass for ``strategy=name``."""
    if name is None or name == "single_device":
        return FedAvgSingleDevice
    if name == "ddp":
        return FedAvgDDP
    hint = (
        "FSDP and DeepSpeed shard the model across ranks, and a party's update must be "
        "the whole model; they are not supported yet (both need GPUs, on which this "
        "release is untested); use 'ddp'"
        if isinstance(name, str) and name.startswith(("fsdp", "deepspeed"))
        else "a ddp variant such as 'ddp_spawn' runs the party in processes that cannot "
        "hold its channel; use 'ddp'"
        if isinstance(name, str) and name.startswith("ddp")
        else "leave it out for one device"
    )
    raise SettingError(
        f"FedAvgStrategy(strategy={name!r}): a party trains on one device (strategy=None) "
        f"or with strategy='ddp'; hint: {hint}"
    )


class FedAvgSingleDevice(FedAvgStrategy, OneDevice, SingleDeviceStrategy):
    """A FedAvg party in one process on one device (``strategy=None``)."""

    @classmethod
    @override
    def _engine_kwargs(cls, options: Mapping[str, Any], config: FedAvgConfig) -> dict[str, Any]:
        if options:
            raise SettingError(
                f"strategy_options={dict(options)!r} configure a multi-process strategy, but "
                "this party trains on one device; hint: add strategy='ddp', or leave "
                "strategy_options out"
            )
        return {"device": "cpu"}  # the Trainer's accelerator moves it

    @override
    def _too_many_devices(self, count: int) -> Exception:
        return FedAvgError(
            f"FedAvgStrategy trains this party on one device, got {count} devices; hint: "
            "FedAvgStrategy(..., strategy='ddp') trains on all of them, or Trainer(devices=1)"
        )


class FedAvgDDP(FedAvgStrategy, DDPStrategy):
    """A FedAvg party on one process per device: Lightning's DDP inside the party.

    Global rank 0 talks to the other parties. On a client every rank loads the same
    global weights (broadcast from rank 0), trains its shard of each epoch with
    gradients averaged by DDP, and rank 0 sends the synchronised model with the samples
    of all ranks. On the aggregator rank 0 runs each round and every rank validates and
    tests its shard of the holdout with the new global model. Only the ``popen`` start
    method (Lightning's default for ``"ddp"``) is supported.
    """

    @classmethod
    @override
    def _engine_kwargs(cls, options: Mapping[str, Any], config: FedAvgConfig) -> dict[str, Any]:
        start = options.get("start_method", "popen")
        if start != "popen":
            raise SettingError(
                f"strategy_options start_method={start!r}: a DDP party starts its ranks as "
                "fresh processes ('popen'), which open their own state; hint: leave "
                "start_method out"
            )
        return dict(options)

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._launcher = _ReportingLauncher(
            self.cluster_environment, self.num_processes, self.num_nodes, self._rank_failed
        )

    def _rank_failed(self, rank: int, returncode: int) -> None:
        """Rank 0, before Lightning stops the party because ``rank`` exited with an error."""
        state_dir = self._current_state_dir()
        reason = peer_reason(state_dir, self.world_size) if state_dir is not None else None
        if reason is None:
            how = (
                f"was killed by {signal.Signals(-returncode).name}"
                if returncode < 0 and -returncode in signal.valid_signals()
                else f"exited with code {returncode}"
            )
            reason = f"rank {rank} of this {self.role}'s DDP processes {how}"
        if self.role == "client":
            self.report_client_failure(reason)
        else:
            self.abort_clients(reason)


class _ReportingLauncher(_SubprocessScriptLauncher):
    """Lightning's DDP launcher, whose watch over the ranks reports a failure first."""

    def __init__(
        self,
        cluster_environment: Any,
        num_processes: int,
        num_nodes: int,
        on_failure: Callable[[int, int], None],
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self._on_failure = on_failure

    @override
    def launch(
        self,
        function: Callable[..., Any],
        *args: Any,
        trainer: pl.Trainer | None = None,
        **kwargs: Any,
    ) -> Any:
        # As Lightning's launch, with a watcher that reports before it kills.
        self.cluster_environment.validate_settings(
            num_devices=self.num_processes, num_nodes=self.num_nodes
        )
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            _ReportingObserver(os.getpid(), self.procs, self._on_failure).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class _ReportingObserver(_ChildProcessObserver):
    def __init__(
        self, main_pid: int, children: list[Any], on_failure: Callable[[int, int], None]
    ) -> None:
        super().__init__(main_pid, children, sleep_period=1)
        self._on_failure = on_failure

    @override
    def _terminate_all(self) -> None:
        for rank, proc in enumerate(self._child_processes, start=1):
            if proc.returncode:
                try:
                    self._on_failure(rank, proc.returncode)
                except Exception as exc:  # never keep the party alive
                    log.warning("could not report rank %d's failure: %s", rank, exc)
                break
        super()._terminate_all()
