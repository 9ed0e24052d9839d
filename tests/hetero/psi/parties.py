"""PSI parties for the multi-process tests (started with spawn)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lightning_fed.channel import Channel, NodeIdentity, TaskConfig


def channel(root: str, node: str, url: str | None = None, options: Any = None) -> Channel:
    keys = Path(root) / "keys"
    task = TaskConfig.load(keys / "task.json")
    me = NodeIdentity.load(keys / f"{node}.key", node)
    return Channel(url or str(Path(root) / "channel"), task, me, storage_options=options).connect()


def run(root: str, node: str, peer: str, ids: list[Any], opts: dict[str, Any]) -> None:
    """Intersect ``ids`` with ``peer``; write the result (or the error) to ``<node>.json``."""
    from lightning_fed.hetero.psi import PsiError, intersect

    logging.basicConfig(filename=str(Path(root) / f"{node}.log"), level=logging.INFO)
    out = Path(root) / f"{node}.json"
    try:
        with channel(root, node, opts.get("url"), opts.get("options")) as ch:
            res = intersect(ch, peer, ids, timeout=opts.get("timeout", 120), workers=1)
        out.write_text(json.dumps({"ids": res.ids, "peer_sizes": res.peer_sizes}))
    except PsiError as exc:
        out.write_text(json.dumps({"error": str(exc)}))


def run_align(
    root: str, node: str, host: str, collaborators: list[str] | None, ids: list[Any], timeout: float
) -> None:
    """``private_intersection`` on one party; the result (or error) to ``<node>.json``."""
    from lightning_fed.hetero.psi import PsiError, private_intersection

    logging.basicConfig(filename=str(Path(root) / f"{node}.log"), level=logging.INFO)
    out = Path(root) / f"{node}.json"
    try:
        with channel(root, node) as ch:
            res = private_intersection(
                ch, ids, host=host, collaborators=collaborators, timeout=timeout, workers=1
            )
        out.write_text(json.dumps({"ids": res.ids, "peer_sizes": res.peer_sizes}))
    except PsiError as exc:
        out.write_text(json.dumps({"error": str(exc)}))
