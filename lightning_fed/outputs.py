"""Files a party writes: weights (safetensors), checkpoints and its report (JSON).

Each file is written to a temporary name in the same folder and renamed, so a crash
never leaves a half-written output.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def temporary_sibling(path: Path) -> Path:
    """A temporary name next to ``path`` (its folder created) to write, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_weights(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write tensors as a safetensors file (load with ``safetensors.torch.load_file``)."""
    final = Path(path)
    tmp = temporary_sibling(final)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, final)
    return final


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def save_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the metrics report as indented JSON (NaN/Inf become null)."""
    final = Path(path)
    tmp = temporary_sibling(final)
    tmp.write_text(json.dumps(_jsonable(dict(report)), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, final)
    return final


def scalar_metrics(
    metrics: Mapping[str, Any], *, skip: tuple[str, ...] = ("step",)
) -> dict[str, float]:
    """The finite scalar entries of a Lightning metrics dict, as floats."""
    out = {}
    for name, value in metrics.items():
        if name in skip:
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[name] = float(value)
    return out


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far (Linux ``VmHWM``), or None elsewhere.

    Unlike ``ru_maxrss``, ``VmHWM`` starts afresh when a process starts a new program,
    so a party launched as ``python -m lightning_fed.party`` reports its own peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
