"""Named tensors to and from safetensors bytes: no pickle ever crosses the channel."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from lightning_fed.channel.names import validate_tensor_name

if TYPE_CHECKING:  # torch is imported on first use: processes that only pass JSON start fast
    import torch


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise named tensors as one safetensors blob.

    Tensors are detached, moved to CPU and made contiguous; tensors that share
    storage (tied weights) are copied so that each name has its own data.

    Raises:
        TypeError: if a value is not a dense tensor.
        InvalidNameError: if a name is empty or has control characters.
    """
    import torch
    from safetensors.torch import save as st_save

    plain: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, value in tensors.items():
        validate_tensor_name(name)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"tensor {name!r} is a {type(value).__name__}, not a torch.Tensor; "
                "hint: put plain numbers in the message body instead"
            )
        if value.layout != torch.strided:
            raise TypeError(f"tensor {name!r} has layout {value.layout}; only dense tensors")
        t = value.detach().cpu().contiguous()
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and ident in seen:
            t = t.clone()
        seen.add(ident)
        plain[name] = t
    return st_save(plain)


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Deserialise a safetensors blob; raises ValueError with the reason if it is malformed."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise ValueError(f"not a valid safetensors blob ({exc})") from exc
