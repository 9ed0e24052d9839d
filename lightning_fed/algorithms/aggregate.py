"""Aggregation maths as pure functions: weighted means by streaming sufficient statistics.

Each client's update is a ``(state, num_samples)`` pair. The aggregate is the mean of
the states weighted by sample count, computed as two running sums, ``sum(n * w)`` and
``sum(n)``, then one division. Updates are folded in one at a time, so the aggregator
holds one accumulator (one model's worth of memory) however many clients there are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TensorSpec:
    """What a federated tensor must look like: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)


def spec_of(state: State) -> dict[str, TensorSpec]:
    """The names, shapes and dtypes of a state, for checking incoming updates."""
    return {name: TensorSpec.of(t) for name, t in state.items()}


def update_problems(expected: Mapping[str, TensorSpec], state: State) -> list[str]:
    """Why ``state`` cannot be averaged into a model described by ``expected``.

    Returns an empty list when the state has exactly the expected names, shapes and
    dtypes and every floating-point value is finite.
    """
    problems = []
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors {_short(missing)}")
    if extra:
        problems.append(f"unexpected tensors {_short(extra)}")
    for name in sorted(set(expected) & set(state)):
        want, got = expected[name], state[name]
        if tuple(got.shape) != want.shape:
            problems.append(f"{name}: shape {tuple(got.shape)}, expected {want.shape}")
        elif got.dtype != want.dtype:
            problems.append(f"{name}: dtype {got.dtype}, expected {want.dtype}")
        elif not all_finite(got):
            problems.append(f"{name}: contains NaN or Inf")
    return problems


FINITE_CHUNK = 1 << 20
"""Elements checked at a time by :func:`all_finite`'s exact pass (4 MiB of float32)."""


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of ``tensor`` is finite (integer tensors always are).

    A fast sum decides in the common case without a temporary tensor: NaN and Inf
    propagate through a sum, so a finite sum proves every element finite. Only when
    the sum is not finite (a NaN/Inf, or an overflow of large finite values) does an
    exact pass run, over chunks of :data:`FINITE_CHUNK` elements, so its temporaries
    stay small whatever the tensor's size.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum())):
        return True
    flat = tensor.detach().reshape(-1)
    chunks = torch.split(flat, FINITE_CHUNK)
    return all(bool(torch.isfinite(chunk).all()) for chunk in chunks)


def _short(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_weight(num_samples: float) -> float:
    try:
        finite = isinstance(num_samples, int | float) and math.isfinite(num_samples)
    except OverflowError:
        finite = False
    if isinstance(num_samples, bool) or not finite or num_samples <= 0:
        raise ValueError(
            f"num_samples must be a finite number > 0, got {num_samples!r}; it is the "
            "weight of the update in the average"
        )
    return float(num_samples)


class WeightedMean:
    """A running weighted mean of states: the sufficient statistics ``sum(n*w)``, ``sum(n)``.

    Floating-point tensors accumulate in their own dtype (at least float32); integer
    tensors (such as BatchNorm's ``num_batches_tracked``) accumulate in float64 and
    are rounded back. :meth:`add` never keeps a reference to the state it is given.

    Example::

        mean = WeightedMean()
        for state, n in updates:        # one at a time, e.g. as they arrive
            mean.add(state, n)
        global_state = mean.compute()
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    @staticmethod
    def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
        if dtype.is_floating_point:
            return torch.promote_types(dtype, torch.float32)
        if dtype.is_complex:
            return dtype
        return torch.float64

    def add(self, state: State, num_samples: float) -> None:
        """Fold in one update weighted by ``num_samples`` (> 0)."""
        weight = _check_weight(num_samples)
        if self.count and set(state) != set(self._sums):
            raise ValueError(
                "every update must have the same tensor names; got "
                f"{sorted(set(state) ^ set(self._sums))[:5]} in only one of them"
            )
        for name, tensor in state.items():  # check everything before adding anything
            known = self._sums.get(name)
            if known is not None and tensor.shape != known.shape:
                raise ValueError(
                    f"{name}: shape {tuple(tensor.shape)} differs from the first "
                    f"update's {tuple(known.shape)}"
                )
        for name, tensor in state.items():
            acc = self._sums.get(name)
            if acc is None:
                self._dtypes[name] = tensor.dtype
                acc_dtype = self._acc_dtype(tensor.dtype)
                # One pass: torch.mul allocates the sum and writes n * w into it.
                self._sums[name] = torch.mul(tensor.detach().to(acc_dtype), weight)
            else:
                acc.add_(tensor.detach().to(device=acc.device), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def merge(self, other: WeightedMean) -> None:
        """Fold in another accumulator's sums, as if its updates had been added here.

        Partial aggregates (a worker's share of the clients, a masked sum) combine
        this way; ``other`` is left as it was.
        """
        if not other.count:
            return
        if self.count and set(other._sums) != set(self._sums):
            raise ValueError(
                "both accumulators must hold the same tensor names; got "
                f"{sorted(set(other._sums) ^ set(self._sums))[:5]} in only one of them"
            )
        for name, acc in other._sums.items():
            mine = self._sums.get(name)
            if mine is not None and mine.shape != acc.shape:
                raise ValueError(
                    f"{name}: shape {tuple(acc.shape)} differs from {tuple(mine.shape)}"
                )
        for name, acc in other._sums.items():
            mine = self._sums.get(name)
            if mine is None:
                self._sums[name] = acc.clone()
                self._dtypes[name] = other._dtypes[name]
            else:
                mine.add_(acc.to(device=mine.device))
        self.total_weight += other.total_weight
        self.count += other.count

    def compute(self) -> dict[str, torch.Tensor]:
        """The weighted mean, in each tensor's original dtype; consumes the sums.

        Raises:
            ValueError: nothing was added.
        """
        if not self.count:
            raise ValueError("no update was added, so there is no mean to compute")
        out = {}
        for name in list(self._sums):
            acc = self._sums.pop(name).div_(self.total_weight)
            dtype = self._dtypes[name]
            if not (dtype.is_floating_point or dtype.is_complex):
                acc = acc.round_()
            out[name] = acc if acc.dtype == dtype else acc.to(dtype)
        self.count = 0
        self.total_weight = 0.0
        return out


def weighted_average(updates: Iterable[tuple[State, float]]) -> dict[str, torch.Tensor]:
    """FedAvg of ``(state, num_samples)`` pairs: ``sum(n_k * w_k) / sum(n_k)`` per tensor."""
    mean = WeightedMean()
    for state, n in updates:
        mean.add(state, n)
    return mean.compute()
