"""Process entry points for the multi-process channel tests (started with spawn)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_fed.channel import Channel, NodeIdentity, TaskConfig


def open_channel(url: str, opts: dict[str, Any], keydir: str, node: str) -> Channel:
    task = TaskConfig.load(Path(keydir) / "task.json")
    identity = NodeIdentity.load(Path(keydir) / f"{node}.key")
    return Channel(url, task, identity, storage_options=opts).connect()


def _mark(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def endless_writer(
    url: str, opts: dict[str, Any], keydir: str, start: int, numel: int, marks: str
) -> None:
    """Send ever larger-numbered chunk messages until killed, marking each send."""
    import torch

    ch = open_channel(url, opts, keydir, "writer")
    i = start
    while True:
        tensor = torch.full((numel,), float(i))
        _mark(marks, f"sending {i}")
        ch.send("chunk", {"i": i}, to="reader", tensors={"x": tensor})
        _mark(marks, f"sent {i}")
        i += 1


def counted_sender(url: str, opts: dict[str, Any], keydir: str, node: str, count: int) -> None:
    """Send ``count`` numbered messages to the node called ``reader``."""
    ch = open_channel(url, opts, keydir, node)
    for i in range(count):
        ch.send("count", {"i": i}, to="reader")


def ping_pong_responder(url: str, opts: dict[str, Any], keydir: str, rounds: int) -> None:
    """Answer ``rounds`` pings with pongs that echo the body and tensors."""
    ch = open_channel(url, opts, keydir, "pong")
    for _ in range(rounds):
        msg = ch.receive("ping", sender="ping", timeout=120)
        ch.send("pong", msg.body, to="ping", round=msg.round, tensors=msg.tensors or None)
