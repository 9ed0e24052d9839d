"""Packed matrix products on CKKS slot vectors: the layouts and the diagonal method.

The secure interactive layer needs three products per batch (α: rows × n, one
collaborator's features; W: n × m, the host's share of its projection; δ: rows × m,
the host's gradient of the projected features; E = ε_acc: n × m, the collaborator's
accumulated noise):

- forward: ``Y = α W`` (α encrypted, W plain);
- weight gradient: ``G = αᵀ δ`` (α encrypted, δ plain);
- input gradient: ``Dᵀ = E δᵀ`` (E encrypted, δ plain).

Each encrypted operand is one ciphertext, packed so that every product is a sum of
``rotate(x, k·stride) ⊙ diagonal_k`` terms (the diagonal method), which
:func:`diagonal_sum` evaluates with baby-step giant-step rotations: about
``2·sqrt(count)`` rotations for ``count`` diagonals, where one ciphertext per feature
column and one product per weight would take ``n·m``.

- Layout A holds α column by column: block ``i`` (``block`` slots) is column ``i``
  over ``padded`` rows (zero beyond the batch), followed by a copy of its first
  ``m - 1`` rows, so that a rotation by ``k < m`` stays inside the block.
  Forward rotates whole blocks; the weight gradient rotates inside blocks, then
  sums every ``m``-th slot (``padded = m·2^R`` makes that ``R`` rotations).
- Layout E holds ε_acc row by row: row ``i`` (``row`` slots) repeats ε_acc[i] so
  that a rotation by ``k < m`` reads ε_acc[i, (c + k) mod m] at position ``c``.

Everything here is plain numpy on slot vectors; the same code runs on ciphertexts
through a :class:`SlotOps` (``ckks.CKKSEvaluator``) and, in tests, on plain vectors
(:class:`PlainOps`), which checks the packing algebra exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from lightning_fed.errors import SettingError

T = TypeVar("T")
Vector = NDArray[np.float64]


class SlotOps(Protocol, Generic[T]):
    """What the diagonal method needs of a slot-vector backend."""

    slots: int

    def rotate(self, x: T, step: int) -> T:
        """``x`` rotated left by ``step`` slots: slot ``p`` gets ``x[(p + step) mod slots]``."""
        ...

    def dot(self, terms: Sequence[tuple[T, Vector]]) -> T:
        """``Σ x ⊙ plain`` over ``terms`` (on ciphertexts: one rescale after the sum)."""
        ...

    def add(self, x: T, y: T) -> T:
        """``x + y``."""
        ...

    def zeros(self) -> T:
        """An encryption of zeros (a product whose plain factors are all zero)."""
        ...


class PlainOps:
    """:class:`SlotOps` on numpy vectors: the packing algebra without encryption."""

    def __init__(self, slots: int) -> None:
        self.slots = slots

    def rotate(self, x: Vector, step: int) -> Vector:
        return np.roll(x, -step)

    def dot(self, terms: Sequence[tuple[Vector, Vector]]) -> Vector:
        total = np.zeros(self.slots)
        for x, p in terms:
            total += x * p
        return total

    def add(self, x: Vector, y: Vector) -> Vector:
        return x + y

    def zeros(self) -> Vector:
        return np.zeros(self.slots)


class PackingError(SettingError):
    """A layer does not fit one ciphertext with these CKKS parameters."""


@dataclass(frozen=True)
class DiagonalPlan:
    """Which rotations :func:`diagonal_sum` makes for ``count`` diagonals."""

    count: int
    stride: int
    offset: int
    slots: int

    @property
    def baby(self) -> int:
        return max(1, math.ceil(math.sqrt(self.count)))

    @property
    def giant(self) -> int:
        return math.ceil(self.count / self.baby)

    def giant_shift(self, g: int) -> int:
        return ((g * self.baby + self.offset) * self.stride) % self.slots

    def steps(self) -> set[int]:
        """The rotation steps (for Galois keys), normalised to ``[1, slots)``."""
        baby = {(h * self.stride) % self.slots for h in range(1, self.baby)}
        giant = {self.giant_shift(g) for g in range(self.giant)}
        return (baby | giant) - {0}


def diagonal_sum(
    ops: SlotOps[T], x: T, diagonals: Sequence[Vector | None], plan: DiagonalPlan
) -> T:
    """``Σ_k rotate(x, (k + offset)·stride) ⊙ diagonals[k]`` in baby-step giant-step form.

    With ``k = g·baby + h``: ``Σ_g rotate(Σ_h rotate(x, h·stride) ⊙ rotate(d_k, -shift_g),
    shift_g)``, where ``shift_g = (g·baby + offset)·stride``; rotating the plain diagonals
    is free, so only ``baby - 1 + giant`` ciphertext rotations remain. ``None`` diagonals
    (all zero) are skipped; if all are, the sum is :meth:`SlotOps.zeros`.
    """
    if len(diagonals) != plan.count:
        raise ValueError(f"{len(diagonals)} diagonals for a plan of {plan.count}")
    rotated: dict[int, T] = {0: x}
    total: T | None = None
    for g in range(plan.giant):
        shift = plan.giant_shift(g)
        terms: list[tuple[T, Vector]] = []
        for h in range(plan.baby):
            k = g * plan.baby + h
            diagonal = diagonals[k] if k < plan.count else None
            if diagonal is None:
                continue
            if h not in rotated:
                rotated[h] = ops.rotate(x, (h * plan.stride) % ops.slots)
            terms.append((rotated[h], np.roll(diagonal, shift)))
        if not terms:
            continue
        inner = ops.dot(terms)
        if shift:
            inner = ops.rotate(inner, shift)
        total = inner if total is None else ops.add(total, inner)
    return ops.zeros() if total is None else total


def _nonzero(vector: Vector) -> Vector | None:
    return vector if np.any(vector) else None


@dataclass(frozen=True)
class Layout:
    """Where one collaborator's projection (``n`` inputs, ``m`` outputs) sits in the slots.

    Args:
        rows: the most rows a batch has (the batch size).
        n: the projection's input width (the collaborator's feature width).
        m: the projection's output width.
        slots: slots per ciphertext (half the polynomial modulus degree).
    """

    rows: int
    n: int
    m: int
    slots: int

    def __post_init__(self) -> None:
        for name in ("rows", "n", "m", "slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        needs = {
            "features (layout A)": max(self.n, self.m) * self.block,
            "noise (layout E)": self.n * self.row,
        }
        for what, size in needs.items():
            if size > self.slots:
                raise PackingError(
                    f"a batch of {self.rows} rows with a {self.n} -> {self.m} projection needs "
                    f"{size} slots for the {what}, but a ciphertext has {self.slots}; hint: "
                    "lower batch_size or the projection's dimensions, or raise "
                    "poly_modulus_degree (each doubling doubles the slots)"
                )

    @property
    def padded(self) -> int:
        """Rows of layout A: the least ``m·2^R`` that holds ``rows``."""
        return int(self.m * 2**self.sum_steps)

    @property
    def sum_steps(self) -> int:
        """``R``: rotations that sum every ``m``-th slot of a block (weight gradient)."""
        return max(0, math.ceil(math.log2(self.rows / self.m))) if self.rows > self.m else 0

    @property
    def block(self) -> int:
        """Slots per column of layout A."""
        return self.padded + self.m - 1

    @property
    def row(self) -> int:
        """Slots per row of layout E."""
        return self.rows + self.m - 1

    # -- the plans ----------------------------------------------------------------------
    @property
    def forward_plan(self) -> DiagonalPlan:
        """Block diagonals ``d = i - j`` from ``-(m - 1)`` to ``n - 1``."""
        return DiagonalPlan(self.n + self.m - 1, self.block, -(self.m - 1), self.slots)

    @property
    def weight_plan(self) -> DiagonalPlan:
        return DiagonalPlan(self.m, 1, 0, self.slots)

    @property
    def input_plan(self) -> DiagonalPlan:
        return DiagonalPlan(self.m, 1, 0, self.slots)

    def sum_shifts(self) -> list[int]:
        return [self.m * 2**r for r in range(self.sum_steps)]

    def rotation_steps(self) -> list[int]:
        """Every rotation step the three products make (for the Galois keys)."""
        steps = self.forward_plan.steps() | self.weight_plan.steps() | self.input_plan.steps()
        return sorted(steps | set(self.sum_shifts()))

    # -- encoding (the collaborator) ----------------------------------------------------
    def _check(self, array: NDArray[np.float64], what: str, shape: tuple[int, ...]) -> None:
        if array.shape != shape:
            raise ValueError(f"{what} of shape {array.shape}; expected {shape}")

    def encode_features(self, alpha: NDArray[np.float64]) -> Vector:
        """Layout A of α (``rows' × n``, ``rows' <= rows``)."""
        if alpha.ndim != 2 or alpha.shape[1] != self.n or not 0 < alpha.shape[0] <= self.rows:
            raise ValueError(
                f"features of shape {alpha.shape}; expected (<= {self.rows}, {self.n})"
            )
        columns = np.zeros((self.n, self.padded))
        columns[:, : alpha.shape[0]] = alpha.T
        blocks = np.concatenate([columns, columns[:, : self.m - 1]], axis=1)
        return self._fill(blocks.reshape(-1))

    def encode_noise(self, eps: NDArray[np.float64]) -> Vector:
        """Layout E of ε_acc (``n × m``)."""
        self._check(eps, "noise", (self.n, self.m))
        reps = math.ceil(self.row / self.m)
        rows = np.tile(eps, (1, reps))[:, : self.row]
        return self._fill(rows.reshape(-1))

    def _fill(self, values: Vector) -> Vector:
        out = np.zeros(self.slots)
        out[: values.size] = values
        return out

    # -- diagonals (the host) -----------------------------------------------------------
    def forward_diagonals(self, weight: NDArray[np.float64]) -> list[Vector | None]:
        """Diagonals of ``Y = α W``: block ``j`` of diagonal ``d`` is ``W[j + d, j]``."""
        self._check(weight, "weight", (self.n, self.m))
        out: list[Vector | None] = []
        for index in range(self.forward_plan.count):
            d = index - (self.m - 1)
            diagonal = np.zeros(self.slots)
            for j in range(self.m):
                if 0 <= j + d < self.n:
                    start = j * self.block
                    diagonal[start : start + self.rows] = weight[j + d, j]
            out.append(_nonzero(diagonal))
        return out

    def weight_diagonals(self, delta: NDArray[np.float64]) -> list[Vector | None]:
        """Diagonals of ``G = αᵀ δ``: slot ``t`` of every block of diagonal ``k`` is
        ``δ[(t + k) mod padded, t mod m]``."""
        rows = self._rows(delta)
        padded = np.zeros((self.padded, self.m))
        padded[:rows] = delta
        t = np.arange(self.padded)
        out: list[Vector | None] = []
        for k in range(self.m):
            block = np.zeros(self.block)
            block[: self.padded] = padded[(t + k) % self.padded, t % self.m]
            out.append(_nonzero(self._fill(np.tile(block, self.n))))
        return out

    def input_diagonals(self, delta: NDArray[np.float64]) -> list[Vector | None]:
        """Diagonals of ``Dᵀ = E δᵀ``: slot ``c`` of every row of diagonal ``k`` is
        ``δ[c, (c + k) mod m]``."""
        rows = self._rows(delta)
        c = np.arange(rows)
        out: list[Vector | None] = []
        for k in range(self.m):
            row = np.zeros(self.row)
            row[:rows] = delta[c, (c + k) % self.m]
            out.append(_nonzero(self._fill(np.tile(row, self.n))))
        return out

    def _rows(self, delta: NDArray[np.float64]) -> int:
        if delta.ndim != 2 or delta.shape[1] != self.m or not 0 < delta.shape[0] <= self.rows:
            raise ValueError(
                f"gradient of shape {delta.shape}; expected (<= {self.rows}, {self.m})"
            )
        return int(delta.shape[0])

    # -- the outputs' positions -------------------------------------------------------------
    def forward_output(self, plain: NDArray[np.float64], rows: int) -> Vector:
        """The slot vector of ``plain`` (``rows × m``) where the forward product puts Y."""
        out = np.zeros(self.slots)
        for j in range(self.m):
            out[j * self.block : j * self.block + rows] = plain[:, j]
        return out

    def read_forward(self, slots: Vector, rows: int) -> NDArray[np.float64]:
        """Y (``rows × m``) from the decrypted forward product."""
        blocks = slots[: self.m * self.block].reshape(self.m, self.block)
        return np.ascontiguousarray(blocks[:, :rows].T)

    def weight_output(self, plain: NDArray[np.float64]) -> Vector:
        """The slot vector of ``plain`` (``n × m``) where the weight gradient puts G."""
        out = np.zeros(self.slots)
        for i in range(self.n):
            out[i * self.block : i * self.block + self.m] = plain[i]
        return out

    def read_weight(self, slots: Vector) -> NDArray[np.float64]:
        """G (``n × m``) from the decrypted weight gradient."""
        blocks = slots[: self.n * self.block].reshape(self.n, self.block)
        return np.ascontiguousarray(blocks[:, : self.m])

    def input_output(self, plain: NDArray[np.float64]) -> Vector:
        """The slot vector of ``plain`` (``rows × n``, i.e. D) where the input gradient
        puts Dᵀ."""
        out = np.zeros(self.slots)
        rows = plain.shape[0]
        for i in range(self.n):
            out[i * self.row : i * self.row + rows] = plain[:, i]
        return out

    def read_input(self, slots: Vector, rows: int) -> NDArray[np.float64]:
        """D (``rows × n``) from the decrypted input gradient."""
        blocks = slots[: self.n * self.row].reshape(self.n, self.row)
        return np.ascontiguousarray(blocks[:, :rows].T)

    # -- the three products -------------------------------------------------------------
    def forward(self, ops: SlotOps[T], features: T, weight: NDArray[np.float64]) -> T:
        """``α W`` in the forward output's positions (zero elsewhere)."""
        return diagonal_sum(ops, features, self.forward_diagonals(weight), self.forward_plan)

    def weight_gradient(self, ops: SlotOps[T], features: T, delta: NDArray[np.float64]) -> T:
        """``αᵀ δ`` in the weight output's positions (partial sums elsewhere)."""
        total = diagonal_sum(ops, features, self.weight_diagonals(delta), self.weight_plan)
        for shift in self.sum_shifts():
            total = ops.add(total, ops.rotate(total, shift))
        return total

    def input_gradient(self, ops: SlotOps[T], noise: T, delta: NDArray[np.float64]) -> T:
        """``δ ε_accᵀ`` (as its transpose) in the input output's positions."""
        return diagonal_sum(ops, noise, self.input_diagonals(delta), self.input_plan)
