"""A party's processes: global rank 0 talks to the channel, the other ranks learn from it.

Under Lightning's DDP a party runs one process per device. Only global rank 0 opens the
channel, checks in, receives the aggregator's instructions and sends the updates; what it
heard reaches the other ranks through the strategy's collectives, so every rank loads
the same global weights and follows the same schedule. With one process everything here
is a plain call.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import Strategy

from lightning_fed.errors import LightningFedError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long rank 0, failing in a collective, waits for another rank's own reason.
PEER_REASON_WAIT = 3.0
#: While rank 0 waits on the channel (a client left out of many rounds waits long),
#: it tells the other ranks every this many seconds, far below the process group's
#: timeout (Lightning's default: 30 minutes), so that they never time out.
KEEPALIVE = 60.0


def quiet_unless_zero(rank: int) -> None:
    """On ranks other than 0, lightning_fed logs warnings and errors only: rank 0 tells
    the party's story once (as Lightning's ``rank_zero_info`` does)."""
    if rank != 0:
        logging.getLogger("lightning_fed").setLevel(logging.WARNING)


class RankError(LightningFedError, RuntimeError):
    """Rank 0 failed in a way that could not be sent as it was; its message says why."""


@dataclass(frozen=True)
class _Raised:
    """What rank 0 raised, as it travels to the other ranks."""

    error: BaseException


@dataclass(frozen=True)
class _Pending:
    """Rank 0 still waits: the other ranks wait for another message."""


class Ranks:
    """This party's processes as its Lightning strategy sees them.

    Args:
        strategy: the party's strategy, after ``setup_environment`` (its process group,
            if any, is up).
    """

    def __init__(self, strategy: Strategy, keepalive: float = KEEPALIVE) -> None:
        self.strategy = strategy
        self.keepalive = keepalive

    @property
    def world_size(self) -> int:
        """How many processes this party runs (1 without DDP)."""
        return int(getattr(self.strategy, "world_size", 1))  # a ParallelStrategy's

    @property
    def rank(self) -> int:
        """This process's global rank within the party."""
        return int(getattr(self.strategy, "global_rank", 0))

    @property
    def is_zero(self) -> bool:
        """Whether this process talks to the channel."""
        return self.rank == 0

    def from_zero(self, call: Callable[[], T]) -> T:
        """Run ``call`` on rank 0; every rank returns its result, or raises its error.

        Every rank must call this at the same point (it is a collective). ``call`` runs
        on a thread of rank 0 and must not use collectives itself; its result must
        pickle; tensors of any size go through :meth:`tensors`. However long ``call``
        takes, the other ranks hear from rank 0 every ``keepalive`` seconds, so their
        collectives never time out.
        """
        if self.world_size == 1:
            return call()
        if not self.is_zero:
            got: Any = self.strategy.broadcast(None, src=0)
            while isinstance(got, _Pending):
                got = self.strategy.broadcast(None, src=0)
            if isinstance(got, _Raised):
                raise got.error
            return got  # type: ignore[no-any-return]
        worker = _Worker(call)
        try:
            while not worker.done.wait(self.keepalive):
                self.strategy.broadcast(_Pending(), src=0)
            value = worker.result()
        except BaseException as exc:
            self.strategy.broadcast(_Raised(_portable(exc)), src=0)
            raise
        self.strategy.broadcast(value, src=0)
        return value

    def tensors(self, tensors: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Rank 0's ``tensors`` on every rank (others pass None), on the CPU.

        The names, shapes and dtypes go as one small message, the data tensor by tensor
        through ``torch.distributed.broadcast``, so nothing is pickled or copied twice.
        """
        if self.world_size == 1:
            assert tensors is not None
            return dict(tensors)
        specs = self.from_zero(
            lambda: [(k, tuple(v.shape), v.dtype) for k, v in (tensors or {}).items()]
        )
        device = self._collective_device()
        out: dict[str, torch.Tensor] = {}
        for name, shape, dtype in specs:
            if self.is_zero:
                assert tensors is not None
                buffer = tensors[name].detach().to(device).contiguous()
            else:
                buffer = torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(buffer, src=0)
            out[name] = buffer.to("cpu")
        if self.is_zero:
            assert tensors is not None
            return dict(tensors)  # rank 0 keeps its own, untouched
        return out

    def total(self, value: int) -> int:
        """The sum of ``value`` over the ranks (each rank counts its own shard)."""
        if self.world_size == 1:
            return value
        summed = self.strategy.reduce(
            torch.tensor(float(value), device=self.strategy.root_device), reduce_op="sum"
        )
        return round(float(summed))

    def barrier(self, name: str) -> None:
        """Wait until every rank reached this point."""
        if self.world_size > 1:
            self.strategy.barrier(name)

    def _collective_device(self) -> torch.device:
        backend = dist.get_backend() if dist.is_initialized() else "gloo"
        return self.strategy.root_device if backend == "nccl" else torch.device("cpu")


class _Worker(Generic[T]):
    """``call`` on a daemon thread (a process that fails meanwhile need not wait for it)."""

    def __init__(self, call: Callable[[], T]) -> None:
        self._call = call
        self._value: T | None = None
        self._error: BaseException | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, name="rank0-channel", daemon=True).start()

    def _run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as exc:
            self._error = exc
        finally:
            self.done.set()

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def _portable(exc: BaseException) -> BaseException:
    """``exc`` itself if it survives pickling, else a :class:`RankError` naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RankError(f"rank 0 failed: {type(exc).__name__}: {exc}")
    return exc


# -- a failing rank's reason, for rank 0 to send -------------------------------------------
def _reason_file(state_dir: Path, rank: int) -> Path:
    return state_dir / f"rank-{rank}.failed.json"


def clear_reasons(state_dir: Path, world_size: int) -> None:
    """Rank 0, before training: forget the failures of an earlier run."""
    for rank in range(1, world_size):
        _reason_file(state_dir, rank).unlink(missing_ok=True)


def leave_reason(state_dir: Path, rank: int, reason: str) -> None:
    """A rank other than 0 that fails leaves its reason where rank 0 will look.

    Only rank 0 talks to the channel; the party's state folder is shared by its ranks
    on one machine. Never raises: failing to write must not hide the failure itself.
    """
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = _reason_file(state_dir, rank)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"rank": rank, "reason": reason}))
        os.replace(tmp, path)
    except Exception as exc:
        log.warning("rank %d: could not leave its failure reason in %s: %s", rank, state_dir, exc)


def broke_collective(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed (typically: another rank stopped)."""
    if isinstance(exc, dist.DistError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset")
    )


def peer_reason(state_dir: Path, world_size: int, wait: float = 0.0) -> str | None:
    """Rank 0: another rank's failure reason, waiting up to ``wait`` seconds for one.

    Rank 0 asks when it failed in a collective that broke because another rank
    stopped (:func:`broke_collective`; then wait :data:`PEER_REASON_WAIT`): that rank's
    own reason is the one worth sending.
    """
    if world_size < 2:
        return None
    deadline = time.monotonic() + wait
    while True:
        for rank in range(1, world_size):
            path = _reason_file(state_dir, rank)
            try:
                got: dict[str, Any] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            return f"rank {got.get('rank', rank)}: {got.get('reason', '?')}"
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)
