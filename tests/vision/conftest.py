"""The torchvision tests: every module here marks its tests ``vision``; they run in .venv-vision.

``make test`` runs them with ``make test-vision`` (``pytest -m vision`` in the
environment with torch 2.14.1 and torchvision 0.29.1); the main environment's run
leaves them out (``-m 'not vision'`` in pyproject.toml).
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _torchvision_present() -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError as err:  # a missing feature, not a skip
        pytest.fail(
            f"the vision tests need torchvision ({err}); run them with `make test-vision`, "
            "which sets up .venv-vision",
            pytrace=False,
        )
