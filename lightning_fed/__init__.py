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
    from lightning_fed.errors import LightningFedError, SettingError
    from lightning_fed.fedavg import FedAvgStrategy
    from lightning_fed.hetero import HeteroDataModule, HeteroNNModule, HeteroNNStrategy
    from lightning_fed.hetero.secure import SecureHeteroNNModule

#: Where each public name lives; imported on first use, so that the channel and the
#: key tools start without importing Lightning.
_LAZY = {
    "FedAvgStrategy": "lightning_fed.fedavg",
    "HeteroDataModule": "lightning_fed.hetero",
    "HeteroNNModule": "lightning_fed.hetero",
    "HeteroNNStrategy": "lightning_fed.hetero",
    "SecureHeteroNNModule": "lightning_fed.hetero.secure",
    "LightningFedError": "lightning_fed.errors",
    "SettingError": "lightning_fed.errors",
}

__all__ = [
    "FedAvgStrategy",
    "HeteroDataModule",
    "HeteroNNModule",
    "HeteroNNStrategy",
    "LightningFedError",
    "SecureHeteroNNModule",
    "SettingError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
