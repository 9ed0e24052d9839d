"""Shared fixtures: a real S3 endpoint (moto server) on 127.0.0.1 and storage backends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

S3_CREDENTIALS = {"key": "testing", "secret": "testing"}


@dataclass(frozen=True)
class Backend:
    """A storage location for one test: its URL and fsspec options."""

    name: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def multiprocess(self) -> bool:
        """Whether other processes can reach it (memory:// lives in one process)."""
        return self.name != "memory"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start a real S3-compatible HTTP server (moto) on 127.0.0.1 for the session."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto S3 server did not start: {Path(log).read_text()[-2000:]}")
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def s3_options(endpoint: str) -> dict[str, Any]:
    """fsspec options for the local endpoint; a fresh instance so no cache is shared."""
    return {
        **S3_CREDENTIALS,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"},
        "skip_instance_cache": True,
    }


def make_bucket(endpoint: str) -> str:
    import s3fs

    bucket = f"lf-{uuid.uuid4().hex[:16]}"
    s3fs.S3FileSystem(**s3_options(endpoint)).mkdir(bucket)
    return bucket


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
    return Backend(name, f"s3://{make_bucket(endpoint)}/fed", s3_options(endpoint))
