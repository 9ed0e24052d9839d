"""Shared fixtures: a real S3 endpoint (moto server) on 127.0.0.1 and storage backends."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lightning_fed.testing import local_s3, make_bucket, s3_storage_options


@dataclass(frozen=True)
class Backend:
    """A storage location for one test: its URL and fsspec options."""

    name: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Any]:
    """``fed("c1", "c2")``: a FedAvg federation of real processes in ``tmp_path``."""
    from tests.fedavg.parties import federations

    yield from federations(tmp_path)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on 127.0.0.1 for the whole session."""
    with local_s3() as url:
        yield url


@pytest.fixture(params=["memory", "file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each storage backend of the conformance suite in turn."""
    return _backend(request.param, request, tmp_path)


@pytest.fixture(params=["file", "s3"])
def shared_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The backends that several processes can share."""
    return _backend(request.param, request, tmp_path)


def _backend(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if name == "memory":
        return Backend(name, f"memory://lf-{uuid.uuid4().hex}")
    if name == "file":
        return Backend(name, (tmp_path / "fed").as_uri())
    endpoint = request.getfixturevalue("s3_endpoint")
    return Backend(name, f"s3://{make_bucket(endpoint)}/fed", s3_storage_options(endpoint))
