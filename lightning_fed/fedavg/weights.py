"""Moving federated tensors in and out of a module (checked before anything is loaded)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from lightning_fed.algorithms.aggregate import TensorSpec, update_problems
from lightning_fed.fedavg.errors import FedAvgError
from lightning_fed.fedavg.selection import select


def federated_state(module: torch.nn.Module, names: Collection[str]) -> dict[str, torch.Tensor]:
    """The module's federated tensors, detached and on the CPU (no copy when already there)."""
    return {k: v.detach().cpu() for k, v in select(module.state_dict(), set(names)).items()}


def copy_state(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy already-checked tensors into the module's parameters and buffers, in place."""
    targets = module.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)


def load_state(
    module: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, TensorSpec],
    source: str,
) -> None:
    """Copy ``tensors`` into the module's parameters and buffers, in place.

    Raises:
        FedAvgError: the tensors' names, shapes or dtypes differ from ``expected``
            (nothing is loaded then), or they hold NaN/Inf.
    """
    problems = update_problems(expected, tensors)
    if problems:
        raise FedAvgError(
            f"the weights from {source} do not fit this party's model: "
            + "; ".join(problems[:5])
            + "; hint: run the same LightningModule (and local_keys) on every party"
        )
    copy_state(module, tensors)
