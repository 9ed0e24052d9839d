"""The communication graph of SecAgg+ (Bell et al., CCS 2020): who masks with whom.

Each client masks with, and shares its secrets among, ``k`` neighbours instead of
every other client. The graph is a Harary graph (a ring where each node links to its
``k/2`` nearest on each side, plus the opposite node for odd ``k``) over the clients
in an order shuffled by a public seed: ``k``-regular, connected, and computable by
every client from the seed and the list of clients, so the aggregator cannot give
different clients different graphs unnoticed.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence


def default_degree(clients: int) -> int:
    """Every other client up to 16 clients; beyond, the smallest even number at least
    ``4 log2(clients)`` (at most ``clients - 1``): logarithmic, as SecAgg+ prescribes."""
    if clients <= 16:
        return clients - 1
    k = math.ceil(4 * math.log2(clients))
    return min(clients - 1, k + k % 2)


def neighbours(clients: Sequence[str], k: int, seed: bytes) -> dict[str, list[str]]:
    """Each client's ``k`` neighbours (sorted), in the Harary graph over ``clients``
    shuffled by ``seed``.

    Raises:
        ValueError: ``k`` is not in ``[1, len(clients) - 1]``, or ``k`` is odd with an odd
            number of clients (no such regular graph exists).
    """
    n = len(clients)
    if len(set(clients)) != n:
        raise ValueError(f"clients must be distinct, got {list(clients)}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"a {n}-client graph has degree 1 to {n - 1}, got {k}")
    if k % 2 and n % 2:
        raise ValueError(f"no {k}-regular graph has {n} nodes (both odd); hint: use {k + 1}")
    order = sorted(clients)
    rng = random.Random(int.from_bytes(hashlib.sha256(seed).digest(), "big"))
    rng.shuffle(order)
    links: dict[str, set[str]] = {c: set() for c in order}
    for i, c in enumerate(order):
        for d in range(1, k // 2 + 1):
            links[c].add(order[(i + d) % n])
            links[c].add(order[(i - d) % n])
        if k % 2:
            links[c].add(order[(i + n // 2) % n])
    return {c: sorted(links[c]) for c in sorted(clients)}
