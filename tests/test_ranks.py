"""Rank 0 talks, the other ranks learn: lightning_fed.ranks over a real gloo process group."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_fed.ranks import Ranks, leave_reason, peer_reason
from tests.processes import CTX


class _Group:
    """The part of a Lightning strategy that Ranks uses, over a plain process group."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.global_rank, self.world_size = rank, world_size
        self.root_device = torch.device("cpu")

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A process group that gives up on a collective after 3 s: rank 0's 5 s wait on
    # "the channel" would break it without the keepalive.
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=3))
    ranks = Ranks(_Group(rank, 2), keepalive=0.5)  # type: ignore[arg-type]
    said: list[str] = []

    def slow() -> str:
        time.sleep(5)
        return "round 3"

    said.append(ranks.from_zero(slow))
    got = ranks.tensors({"w": torch.arange(6.0).reshape(2, 3)} if rank == 0 else None)
    said.append(str(got["w"].tolist()))
    said.append(str(ranks.total(10 + rank)))

    def fails() -> None:
        raise ValueError("the aggregator aborted the federation")

    try:
        ranks.from_zero(fails)
    except ValueError as exc:
        said.append(f"raised {exc}")
    Path(out, f"rank{rank}.txt").write_text("\n".join(said))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_rank_zero_talks_and_the_other_ranks_learn_even_after_a_long_wait(
    tmp_path: Path,
) -> None:
    port = _free_port()
    procs = [CTX.Process(target=_rank, args=(r, port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().splitlines() == [
            "round 3",  # 5 s on rank 0, past the group's 3 s timeout: the keepalive held
            "[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]",  # rank 0's weights
            "21",  # 10 + 11: the samples of both ranks
            "raised the aggregator aborted the federation",  # rank 0's error, everywhere
        ]


def test_a_failing_rank_leaves_its_reason_for_rank_zero(tmp_path: Path) -> None:
    assert peer_reason(tmp_path, 2) is None
    leave_reason(tmp_path, 1, "RuntimeError: CUDA out of memory")
    assert peer_reason(tmp_path, 2) == "rank 1: RuntimeError: CUDA out of memory"
    assert peer_reason(tmp_path, 1) is None  # one process: nobody else to ask
