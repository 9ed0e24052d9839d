"""The seam every federated algorithm goes through.

An algorithm has three parts; FedAvg uses the defaults of all three:

- a :class:`Statistic`: how the aggregator folds a round's client updates. It is a
  mergeable sufficient statistic (FedAvg's ``sum(n*w)`` and ``sum(n)``), so updates
  stream in one at a time and partial aggregates can be merged;
- :meth:`Algorithm.server_update`: how the new global model is made from the
  aggregate (replace it, or a server optimiser's step on the pseudo-gradient);
- a :class:`ClientAlgorithm`: a Lightning callback that clients install for the
  run, for per-round client logic (a gradient correction in
  ``on_before_optimizer_step``, extra tensors to upload).

The aggregator chooses the algorithm; clients learn its name and parameters from
every round's message and build their side from :func:`algorithm_from`, so a
client's settings do not change when the algorithm does. Algorithms never touch
storage: their extra tensors travel inside the round's messages, with names that
start with :data:`EXTRA` (a character no state-dict key starts with).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core import LightningModule

from lightning_fed.algorithms.aggregate import TensorSpec, WeightedMean
from lightning_fed.errors import LightningFedError, SettingError

Tensors = dict[str, torch.Tensor]
V = TypeVar("V")

#: The first character of an algorithm's own tensors in round and update messages.
EXTRA = "@"


class AlgorithmError(LightningFedError):
    """An algorithm cannot go on: a peer sent tensors it cannot use, or an unknown name."""


@dataclass(frozen=True)
class ModelSpec:
    """The federated part of the model, as an algorithm sees it.

    Attributes:
        tensors: every federated tensor's shape and dtype (parameters and buffers).
        trainable: the names among them that are parameters with ``requires_grad``;
            server optimisers and client corrections act on these only, and buffers
            (BatchNorm statistics, counters) take the clients' mean.
    """

    tensors: Mapping[str, TensorSpec]
    trainable: frozenset[str]

    @classmethod
    def of(cls, module: torch.nn.Module, names: list[str]) -> ModelSpec:
        """The spec of ``module``'s federated tensors ``names``."""
        state = module.state_dict()
        wanted = set(names)
        trainable = {n for n, p in module.named_parameters() if p.requires_grad and n in wanted}
        tensors = {n: TensorSpec.of(state[n]) for n in names}
        return cls(tensors, frozenset(n for n in trainable if tensors[n].dtype.is_floating_point))


@dataclass
class ClientUpdate:
    """One client's contribution to a round, already checked against the specs."""

    sender: str
    tensors: Mapping[str, torch.Tensor] = field(repr=False)
    num_samples: int
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)


@dataclass
class RoundAggregate:
    """What a round's statistic produced.

    Attributes:
        mean: the candidate global model (FedAvg: the sample-weighted mean of the
            clients' models; a robust statistic: its estimate).
        extras: the algorithm's uploaded extras, averaged over clients (unweighted).
        clients: how many updates were folded in.
        samples: their total sample count.
    """

    mean: Tensors = field(repr=False)
    extras: Tensors = field(repr=False)
    clients: int
    samples: float


class Statistic:
    """How a round's updates are folded: FedAvg's streaming, mergeable weighted mean.

    Model tensors are weighted by the clients' sample counts; extras (an
    algorithm's own uploads) by one per client. Subclasses that need every update
    (robust statistics) override all three methods.
    """

    def __init__(self) -> None:
        self.model = WeightedMean()
        self.extras = WeightedMean()
        self.samples = 0.0

    def add(self, update: ClientUpdate) -> None:
        """Fold in one update; keeps no reference to its tensors."""
        self.model.add(update.tensors, update.num_samples)
        if update.extras:
            self.extras.add(update.extras, 1)
        self.samples += update.num_samples

    def merge(self, other: Statistic) -> None:
        """Fold in another statistic's updates (a partial aggregate of the same round)."""
        self.model.merge(other.model)
        self.extras.merge(other.extras)
        self.samples += other.samples

    def result(self) -> RoundAggregate:
        """The aggregate; consumes the sums."""
        clients = self.model.count
        extras = self.extras.compute() if self.extras.count else {}
        return RoundAggregate(self.model.compute(), extras, clients, self.samples)


_REGISTRY: dict[str, type[Algorithm]] = {}


class Algorithm:
    """A federated algorithm; this base class is FedAvg (McMahan et al., AISTATS 2017).

    Subclass it in one file: set ``name`` (the registry name clients look up), take
    the hyperparameters as typed ``__init__`` arguments stored under the same names
    (they travel to clients as JSON, and LightningCLI sets them from YAML), and
    override what differs from FedAvg. Server-side state (optimiser moments,
    controls) goes through :meth:`state_dict`, which the aggregator's recovery
    checkpoint holds.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not name:
            return  # an abstract helper class
        known = _REGISTRY.get(name)
        if known is not None and _where(known) != _where(cls):
            raise SettingError(
                f"two algorithms are named {name!r}: {_where(known)} and {_where(cls)}; "
                "hint: give your algorithm its own name"
            )
        _REGISTRY[name] = cls

    # -- identity -----------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The hyperparameters, from the ``__init__`` arguments of the same names."""
        out = {}
        for arg in inspect.signature(type(self).__init__).parameters.values():
            if arg.name == "self" or arg.kind in (arg.VAR_POSITIONAL, arg.VAR_KEYWORD):
                continue
            out[arg.name] = getattr(self, arg.name)
        return out

    def describe(self) -> dict[str, Any]:
        """``{"name", "params"}``: what the round message tells the clients."""
        if not self.name:
            raise SettingError(f"{type(self).__name__} has no name; hint: set name = '...'")
        params = self.params()
        try:
            json.dumps(params, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise SettingError(
                f"algorithm {self.name!r}: its parameters {params!r} must be JSON numbers, "
                f"strings, booleans, lists or null ({exc})"
            ) from None
        return {"name": self.name, "params": params}

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({shown})"

    # -- the aggregator's side --------------------------------------------------------
    def setup(self, model: ModelSpec, clients: int) -> None:
        """Called on the aggregator before round 1 (and before restoring state).

        Args:
            model: the federated tensors.
            clients: how many clients the federation has (SCAFFOLD's ``N``).
        """

    def statistic(self) -> Statistic:
        """A fresh accumulator for one round's updates."""
        return Statistic()

    def round_tensors(self) -> Tensors:
        """Extra tensors sent to the round's clients with the global model."""
        return {}

    def upload_spec(self) -> dict[str, TensorSpec]:
        """The extra tensors every client must upload with its model (checked on arrival)."""
        return {}

    def server_update(
        self, global_state: Mapping[str, torch.Tensor], aggregate: RoundAggregate
    ) -> Tensors:
        """The next global model. FedAvg: the aggregate itself.

        ``global_state`` may share memory with the live model: never modify it in place.
        """
        return aggregate.mean

    def state_dict(self) -> dict[str, Any]:
        """Server-side state to checkpoint with each round (tensors, numbers, strings)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output after an aggregator restart."""

    # -- the client's side ------------------------------------------------------------
    def client(self) -> ClientAlgorithm | None:
        """The callback a client installs for this algorithm (None: plain local training)."""
        return None


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class ClientRound:
    """What a client's algorithm learns when a round begins.

    Attributes:
        round: the round number (a repeated number: the aggregator restarted it).
        module: the client's LightningModule, with ``global_state`` loaded already.
        model: the federated tensors' spec.
        global_state: the global model of this round.
        tensors: the algorithm's extra tensors of this round (names without ``@``).
    """

    round: int
    module: LightningModule
    model: ModelSpec
    global_state: Mapping[str, torch.Tensor] = field(repr=False)
    tensors: Mapping[str, torch.Tensor] = field(repr=False)


class ClientAlgorithm(Callback):
    """An algorithm's client side: a Lightning callback plus two round hooks.

    Use Lightning's hooks for what happens during local training, e.g.
    ``on_before_optimizer_step`` (it runs after AMP unscaling and once per
    accumulated step, before gradient clipping). :meth:`state_dict` is kept in the
    client's state folder after every round, so a restarted client carries on.
    """

    def start_round(self, start: ClientRound) -> None:
        """A round begins (see :class:`ClientRound` for what it brings)."""

    def finish_round(self, module: LightningModule) -> Tensors:
        """Local training ended: the extra tensors to upload (names without ``@``)."""
        return {}


def stepping_parameters(optimizer: Any) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """``(param_group, parameter)`` for every parameter of ``optimizer`` with a gradient:
    what a correction in ``on_before_optimizer_step`` acts on."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                yield group, p


def algorithm_from(description: Mapping[str, Any]) -> Algorithm:
    """Build the algorithm a round message describes, from the registry.

    Raises:
        AlgorithmError: the name is unknown in this process, or its parameters do not
            fit the class.
    """
    name, params = description.get("name"), description.get("params", {})
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise AlgorithmError(
            f"the aggregator runs algorithm {name!r}, which this client does not know "
            f"(known: {', '.join(sorted(_REGISTRY))}); hint: import the module that "
            "defines it in the client process, e.g. next to your LightningModule"
        )
    if not isinstance(params, dict):
        raise AlgorithmError(f"algorithm {name!r}: params must be an object, got {params!r}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise AlgorithmError(
            f"algorithm {name!r} cannot be built from the aggregator's params {params!r}: {exc}"
        ) from None


def known_algorithms() -> list[str]:
    """The names clients of this process can follow."""
    return sorted(_REGISTRY)


def with_extras(model: Mapping[str, V], extras: Mapping[str, V]) -> dict[str, V]:
    """One message's tensors (or specs): the model's, then the algorithm's under :data:`EXTRA`."""
    out = dict(model)
    out.update({EXTRA + k: v for k, v in extras.items()})
    return out


def split_extras(tensors: Mapping[str, torch.Tensor]) -> tuple[Tensors, Tensors]:
    """A message's tensors as ``(model, extras)``, extras without their :data:`EXTRA`."""
    model, extras = {}, {}
    for k, v in tensors.items():
        if k.startswith(EXTRA):
            extras[k[len(EXTRA) :]] = v
        else:
            model[k] = v
    return model, extras


def check_number(
    name: str,
    value: float,
    *,
    at_least: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> float:
    """A finite hyperparameter within the given bounds, as a float.

    Raises:
        SettingError: not a number, not finite, or out of bounds (the message says which).
    """
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    rules = []
    if at_least is not None:
        rules.append(f">= {at_least:g}")
    if above is not None:
        rules.append(f"> {above:g}")
    if below is not None:
        rules.append(f"< {below:g}")
    if ok:
        v = float(value)
        ok = (
            math.isfinite(v)
            and (at_least is None or v >= at_least)
            and (above is None or v > above)
            and (below is None or v < below)
        )
    if not ok:
        rule = " and ".join(rules) if rules else "finite"
        raise SettingError(f"{name} must be a finite number {rule}, got {value!r}")
    return float(value)
