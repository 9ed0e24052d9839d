"""Looking for known values in what a party received: as numbers and as raw bytes.

A value is *found* in a tensor if some element equals it exactly (in float64, so a
float32 feature sent as is, or widened, matches; a computed value does not by chance).
Values count both as given and rounded to float32. In raw bytes (ciphertexts, keys,
files) 8-byte patterns are looked for: every value as float64, and every two
neighbours (row-wise and column-wise) as float32. A random 8-byte window matches one
of P patterns with probability P / 2^64: never by chance.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch


class KnownValues:
    """The values that must not reach the host, from tensors of any shape."""

    def __init__(self, tensors: Iterable[torch.Tensor | np.ndarray]) -> None:
        exact = [np.asarray(t, dtype=np.float64).reshape(-1) for t in tensors]
        arrays = [np.asarray(t, dtype=np.float32) for t in tensors]
        rounded = [a.reshape(-1).astype(np.float64) for a in arrays]
        flat = np.concatenate(exact + rounded)
        self.values = np.unique(flat[flat != 0])
        pairs = [self.values.view(np.uint64)]
        for a in arrays:
            for order in (a, a.T if a.ndim == 2 else a):
                f = np.ascontiguousarray(order, dtype=np.float32).reshape(-1)
                if f.size > 1:
                    neighbours = np.stack([f[:-1], f[1:]], axis=1)
                    pairs.append(np.ascontiguousarray(neighbours).view(np.uint64).reshape(-1))
        self.patterns = np.unique(np.concatenate(pairs))

    def in_tensor(self, tensor: torch.Tensor | np.ndarray) -> bool:
        got = np.asarray(tensor, dtype=np.float64).reshape(-1)
        return bool(np.isin(got, self.values).any())

    def in_bytes(self, data: bytes) -> bool:
        for offset in range(8):
            count = (len(data) - offset) // 8
            if count <= 0:
                continue
            words = np.frombuffer(data, dtype=np.uint64, count=count, offset=offset)
            if np.isin(words, self.patterns).any():
                return True
        return False
