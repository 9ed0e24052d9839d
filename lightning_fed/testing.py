"""Helpers for tests, benchmarks and demos: a real local S3 endpoint.

:func:`local_s3` starts moto's S3-compatible HTTP server in a child process bound
to 127.0.0.1 (the same server s3fs's own tests use) and yields its endpoint URL.
It needs the ``dev`` extra (``moto[server]`` and ``s3fs``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

S3_TEST_CREDENTIALS = {"key": "testing", "secret": "testing"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_s3(startup_timeout: float = 60.0) -> Iterator[str]:
    """Run an S3 endpoint on 127.0.0.1 for the duration of the ``with`` block.

    Yields:
        The endpoint URL, e.g. ``http://127.0.0.1:41234``.

    Raises:
        RuntimeError: if the server does not answer within ``startup_timeout`` seconds,
            with the tail of its log.
    """
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + startup_timeout
        try:
            while True:
                try:
                    urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        tail = log.read()[-2000:].decode(errors="replace")
                        raise RuntimeError(
                            f"the local S3 server (moto) did not start on port {port}: {tail}; "
                            "hint: install the dev extra (pip install -e '.[dev]')"
                        ) from None
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def s3_storage_options(endpoint: str) -> dict[str, Any]:
    """fsspec options for :func:`local_s3`'s endpoint (a fresh, uncached s3fs instance)."""
    return {
        **S3_TEST_CREDENTIALS,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"},
        "skip_instance_cache": True,
    }


def make_bucket(endpoint: str) -> str:
    """Create a bucket with a unique name on the endpoint and return its name."""
    import s3fs

    bucket = f"lf-{uuid.uuid4().hex[:16]}"
    s3fs.S3FileSystem(**s3_storage_options(endpoint)).mkdir(bucket)
    return bucket
