"""Starting the privacy tests' federations: five clients of growing data by default."""

from __future__ import annotations

from typing import Any

FAST = {"schedule_timeout": 60, "calculation_timeout": 60}
CLIENTS = ["c1", "c2", "c3", "c4", "c5"]


def run(
    fed: Any,
    folder: str,
    rounds: int,
    agg: dict[str, Any],
    client: dict[str, Any] | None = None,
    party: dict[str, Any] | None = None,
    parties: dict[str, dict[str, Any]] | None = None,
    clients: list[str] = CLIENTS,
    agg_party: dict[str, Any] | None = None,
    each: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """Start ``clients`` (client ``i`` with data seed ``i + 1`` and ``32 + 16 i`` samples)
    and the aggregator ``agg`` in ``folder``; returns the federation.

    Args:
        client: strategy settings of every client; ``each``: of one client.
        party: party options of every client; ``parties``: of one client.
        agg_party: the aggregator's party options.
    """
    f = fed(*clients, folder=folder)
    for i, c in enumerate(clients):
        f.start(
            c,
            "client",
            {**FAST, **(client or {}), **(each or {}).get(c, {})},
            {
                "data_seed": i + 1,
                "n": 32 + 16 * i,
                **(party or {}),
                **(parties or {}).get(c, {}),
            },
        )
    f.start("agg", "aggregator", {**FAST, "rounds": rounds, **agg}, agg_party)
    return f
