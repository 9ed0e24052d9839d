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

__all__ = ["__version__"]
