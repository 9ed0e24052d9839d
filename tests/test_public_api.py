"""What ``from lightning_fed import ...`` offers, and the one error base class."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import lightning_fed


def test_every_public_name_resolves_and_the_package_imports_lightning_lazily() -> None:
    for name in lightning_fed.__all__:
        assert getattr(lightning_fed, name) is not None, name
    code = "import sys, lightning_fed; sys.exit('lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_user_facing_classes_are_one_import_away() -> None:
    from lightning_fed import (  # noqa: F401
        FedAvgStrategy,
        HeteroDataModule,
        HeteroNNModule,
        HeteroNNStrategy,
        LightningFedError,
        SecureHeteroNNModule,
    )
    from lightning_fed.algorithms import (  # noqa: F401
        Algorithm,
        FedAdagrad,
        FedAdam,
        FedAvg,
        FedAvgM,
        FedProx,
        FedYogi,
        Scaffold,
    )


def test_every_error_the_package_defines_derives_from_lightning_fed_error() -> None:
    found = []
    for info in pkgutil.walk_packages(lightning_fed.__path__, "lightning_fed."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("lightning_fed"):
                found.append(obj)
    assert len(found) > 15
    strays = [f"{c.__module__}.{c.__qualname__}" for c in found]
    strays = [
        s
        for s, c in zip(strays, found, strict=True)
        if not issubclass(c, lightning_fed.LightningFedError)
    ]
    assert strays == []
