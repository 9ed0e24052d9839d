"""lightning_fed: federated learning as a PyTorch Lightning plugin.

The package grows in layers: :mod:`lightning_fed.channel` moves signed messages
and tensors between parties over any fsspec URL; the FedAvg and HeteroNN layers
build on it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lightning-fed")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

from typing import TYPE_CHECKING, Any

from lightning_fed.logs import install_default_handler

install_default_handler()  # per-round and waiting lines show without any logging set up

if TYPE_CHECKING:
    from lightning_fed.fedavg import FedAvgStrategy

__all__ = ["FedAvgStrategy", "__version__"]


def __getattr__(name: str) -> Any:
    # Lightning is imported only when a strategy is asked for, so that the channel
    # and the key tools start fast.
    if name == "FedAvgStrategy":
        from lightning_fed.fedavg import FedAvgStrategy

        return FedAvgStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
