"""Split one dataset's indices across simulated clients: IID or Dirichlet non-IID, seeded.

Both return one sorted index list per client; use them with
:class:`torch.utils.data.Subset`::

    parts = dirichlet_partition(labels, clients=3, alpha=0.5, seed=0)
    local = Subset(dataset, parts[client_index])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _check_clients(clients: int, size: int) -> None:
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients must be an int >= 1, got {clients!r}")
    if clients > size:
        raise ValueError(
            f"cannot split {size} samples across {clients} clients: each needs at least one; "
            "hint: use fewer clients or more data"
        )


def iid_partition(size: int, clients: int, *, seed: int = 0) -> list[list[int]]:
    """Shuffle ``range(size)`` with ``seed`` and deal it into ``clients`` near-equal parts."""
    _check_clients(clients, size)
    order = np.random.default_rng(seed).permutation(size).tolist()
    return [sorted(order[i::clients]) for i in range(clients)]


def dirichlet_partition(
    labels: Sequence[int] | torch.Tensor | np.ndarray,
    clients: int,
    *,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[list[int]]:
    """Label-skewed split: each class is shared out by proportions drawn from Dir(alpha).

    Small ``alpha`` (0.1) gives each client a few dominant classes; large ``alpha``
    (1000) approaches IID. Draws repeat (from the same seeded stream) until every
    client has at least ``min_size`` samples.

    Raises:
        ValueError: bad arguments, or no draw within ``max_tries`` gave every client
            ``min_size`` samples.
    """
    y = np.asarray(torch.as_tensor(labels).flatten())
    _check_clients(clients, int(y.size))
    if not (isinstance(alpha, int | float) and alpha > 0):
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}; smaller is more skewed")
    if min_size * clients > y.size:
        raise ValueError(f"min_size={min_size} x {clients} clients exceeds the {y.size} samples")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            props = rng.dirichlet(np.full(clients, float(alpha)))
            cuts = np.round(np.cumsum(props)[:-1] * idx.size).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave every one of {clients} "
        f"clients at least {min_size} samples; hint: raise alpha or lower min_size"
    )
