"""Federated evaluation: clients validate the global model, the aggregator merges exactly.

A client validates the global model on its own data with its own Lightning
validation loop. What it logged comes back to the aggregator in two forms:

- every logged value as a float, with the number of validation samples; the
  aggregator's fallback is the sample-weighted mean of these floats, which is exact
  for means of per-sample quantities (accuracy, mean loss) and wrong for metrics
  that are not (AUROC, F1, precision with several classes, any median or maximum);
- for every torchmetrics ``Metric`` object that was logged
  (``self.log("val_auroc", self.val_auroc)``), its state tensors. The aggregator
  merges the states of all clients into its own copy of the same metric
  (``Metric.merge_state``) and computes it: the result equals the metric computed on
  all clients' data pooled.

Lightning's internals are reached through :mod:`lightning_fed.trainer_access` only.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from torchmetrics import Metric
from typing_extensions import override

from lightning_fed.ranks import Ranks
from lightning_fed.trainer_access import callbacks_of, logged_results, validate_inside_fit

log = logging.getLogger(__name__)

#: The first character of evaluation state tensors in update and evaluation messages.
EVAL = "#"


@dataclass
class MetricState:
    """One logged ``Metric``'s state: where the metric lives in the module, and its tensors."""

    path: str  # the metric's name among the module's submodules
    cls: str  # its class's qualified name, checked by the aggregator
    tensors: dict[str, torch.Tensor] = field(repr=False)
    lists: list[str] = field(default_factory=list)  # states that are lists (cat states)


@dataclass
class Evaluation:
    """What one client's validation of a global model produced."""

    round: int  # the round whose global model was validated (0: the initial model)
    samples: int
    metrics: dict[str, float]
    states: dict[str, MetricState] = field(default_factory=dict)

    def encode(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A JSON body and the state tensors (names start with :data:`EVAL`)."""
        tensors: dict[str, torch.Tensor] = {}
        states = []
        for i, (name, state) in enumerate(sorted(self.states.items())):
            for attr, value in state.tensors.items():
                tensors[f"{EVAL}eval/{i}/{attr}"] = value.detach().cpu().contiguous()
            states.append(
                {
                    "name": name,
                    "path": state.path,
                    "class": state.cls,
                    "attrs": sorted(state.tensors),
                    "lists": sorted(state.lists),
                }
            )
        body = {
            "round": self.round,
            "samples": self.samples,
            "metrics": {k: v for k, v in self.metrics.items() if math.isfinite(v)},
            "states": states,
        }
        return body, tensors

    @classmethod
    def decode(
        cls, body: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], sender: str
    ) -> Evaluation:
        """Parse a peer's evaluation defensively.

        Raises:
            ValueError: a field is missing or of the wrong type, or a named state tensor
                is not there.
        """
        what = f"evaluation from {sender!r}"
        rnd, samples = body.get("round"), body.get("samples")
        if not (isinstance(rnd, int) and isinstance(samples, int)) or not (
            _is_int(rnd) and _is_int(samples) and rnd >= 0 and samples >= 0
        ):
            raise ValueError(f"{what}: round and samples must be ints >= 0")
        raw = body.get("metrics")
        if not isinstance(raw, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in raw.values()
        ):
            raise ValueError(f"{what}: metrics must map names to numbers")
        states: dict[str, MetricState] = {}
        entries = body.get("states", [])
        if not isinstance(entries, list):
            raise ValueError(f"{what}: states must be a list")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not all(
                isinstance(entry.get(k), str) for k in ("name", "path", "class")
            ):
                raise ValueError(f"{what}: state {i} needs string name, path and class")
            attrs, lists = entry.get("attrs"), entry.get("lists", [])
            if not isinstance(attrs, list) or not isinstance(lists, list):
                raise ValueError(f"{what}: state {i}: attrs and lists must be lists")
            found = {}
            for attr in attrs:
                tensor = tensors.get(f"{EVAL}eval/{i}/{attr}")
                if not isinstance(attr, str) or tensor is None:
                    raise ValueError(f"{what}: state {i} names {attr!r} but sent no such tensor")
                found[attr] = tensor
            listed = [a for a in lists if isinstance(a, str) and a in found]
            states[entry["name"]] = MetricState(entry["path"], entry["class"], found, listed)
        metrics = {str(k): float(v) for k, v in raw.items()}
        return cls(rnd, samples, metrics, states)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def split_evaluation(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A message's tensors as ``(the rest, evaluation states)``."""
    rest: dict[str, torch.Tensor] = {}
    states: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        (states if k.startswith(EVAL) else rest)[k] = v
    return rest, states


# -- the client's side -----------------------------------------------------------------
class Capture(Callback):
    """A callback for one validation or test run: its sample count and logged ``Metric``
    states (install it for the run, then call :meth:`evaluation`)."""

    def __init__(self, round: int) -> None:
        self.round = round
        self.samples = 0
        self.names: set[str] = set()
        self.states: dict[str, MetricState] = {}
        self.ran = False

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        try:
            self.samples += extract_batch_size(batch)
        except Exception:  # a batch Lightning cannot measure counts as one sample
            self.samples += 1
        self.ran = True

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The names logged and the states of the Metric objects among them.

        In a party of several processes (DDP) every rank saw a shard: the sample count
        is their sum and each ``Metric``'s state is synchronised (``dist_reduce_fx``)
        before it is read, so rank 0 holds the whole party's evaluation.
        """
        ranks = Ranks(trainer.strategy)
        if ranks.world_size > 1:
            self.samples = ranks.total(self.samples)
            self.ran = self.samples > 0
        module = pl_module
        paths = {id(m): name for name, m in module.named_modules() if isinstance(m, Metric)}
        for result in logged_results(trainer):
            name = result.meta.name
            self.names.add(name)
            metric = result.value
            if result.is_tensor or not isinstance(metric, Metric) or id(metric) not in paths:
                continue
            # Syncing concatenates a list state into one tensor: note which were lists first.
            lists = [a for a, v in metric.metric_state.items() if isinstance(v, list)]
            with metric.sync_context(should_sync=ranks.world_size > 1, should_unsync=True):
                tensors = _state_tensors(metric)
            states = MetricState(paths[id(metric)], type(metric).__qualname__, tensors, lists)
            self.states[name] = states

    # A test run is counted and collected exactly as a validation run.
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end

    def evaluation(self, callback_metrics: Mapping[str, Any]) -> Evaluation | None:
        """The run's evaluation, or None when no validation batch ran."""
        if not self.ran:
            return None
        metrics = {}
        for name in self.names:
            value = callback_metrics.get(name)
            if (isinstance(value, torch.Tensor) and value.numel() == 1) or (
                isinstance(value, int | float) and not isinstance(value, bool)
            ):
                metrics[name] = float(value)
        return Evaluation(self.round, self.samples, metrics, self.states)


def _state_tensors(metric: Metric) -> dict[str, torch.Tensor]:
    """A metric's state as tensors on the CPU (a list state concatenated)."""
    tensors = {}
    for attr, value in metric.metric_state.items():
        if isinstance(value, list):
            value = (
                torch.cat([v.reshape(-1, *v.shape[1:]) for v in value]) if value else torch.zeros(0)
            )
        tensors[attr] = value.detach().clone().cpu()
    return tensors


def validate_now(trainer: pl.Trainer, round: int) -> Evaluation | None:
    """Validate the module as it is now, from inside ``fit``, as Lightning does between
    training batches (``val_check_interval``), then return to training.

    Returns:
        The evaluation of the global model of ``round``, or None without validation data.
    """
    capture = Capture(round)
    callbacks = callbacks_of(trainer)
    callbacks.append(capture)
    try:
        validate_inside_fit(trainer)
    finally:
        callbacks.remove(capture)
    return capture.evaluation(trainer.callback_metrics)


# -- the aggregator's side -----------------------------------------------------------
def merge(
    module: torch.nn.Module, evaluations: Iterable[tuple[str, Evaluation]]
) -> tuple[dict[str, float], list[str]]:
    """The federated value of every logged name, and the names merged exactly.

    A name is merged exactly when every client that logged it sent the state of a
    ``Metric`` that the aggregator's module has at the same path and of the same
    class; otherwise it is the sample-weighted mean of the clients' floats.
    """
    evaluations = [(c, e) for c, e in evaluations if e.samples > 0]
    names = sorted({n for _, e in evaluations for n in e.metrics} | _state_names(evaluations))
    out: dict[str, float] = {}
    exact: list[str] = []
    for name in names:
        value = _merged_metric(module, name, evaluations)
        if value is not None:
            out[name] = value
            exact.append(name)
            continue
        pairs = [(e.metrics[name], e.samples) for _, e in evaluations if name in e.metrics]
        total = sum(n for _, n in pairs)
        if total > 0:
            out[name] = sum(v * n for v, n in pairs) / total
    return out, exact


def _state_names(evaluations: list[tuple[str, Evaluation]]) -> set[str]:
    return {n for _, e in evaluations for n in e.states}


def _merged_metric(
    module: torch.nn.Module, name: str, evaluations: list[tuple[str, Evaluation]]
) -> float | None:
    reporting = [(c, e) for c, e in evaluations if name in e.metrics or name in e.states]
    if not reporting or any(name not in e.states for _, e in reporting):
        return None
    first = reporting[0][1].states[name]
    try:
        target = module.get_submodule(first.path)
    except AttributeError:
        return None
    if not isinstance(target, Metric) or type(target).__qualname__ != first.cls:
        return None
    metric = copy.deepcopy(target)
    metric.reset()
    # The clients' states are all here: no sync with this party's other DDP ranks
    # (only the aggregator's rank 0 merges).
    metric.sync_on_compute = False
    metric._to_sync = False
    for client, evaluation in reporting:
        state = evaluation.states[name]
        if state.path != first.path or state.cls != first.cls:
            return None
        incoming: dict[str, Any] = {
            k: ([v] if v.numel() else []) if k in state.lists else v.to(_device_of(metric))
            for k, v in state.tensors.items()
        }
        try:
            metric.merge_state(incoming)
            metric._update_count += 1  # as if this client's updates had run here
        except Exception as exc:  # a state that does not fit: fall back, say why
            log.warning(
                "aggregator: %s's state of %r cannot be merged (%s); using the weighted mean",
                client,
                name,
                exc,
            )
            return None
    try:
        value = metric.compute()
    except Exception as exc:
        log.warning("aggregator: merged %r cannot be computed (%s)", name, exc)
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return None


def _device_of(metric: Metric) -> torch.device:
    return metric.device
