"""What only a local (or NFS) directory can suffer: FIFOs, symlinks planted by a peer with
write access, leftover temp files; and storage errors that must name the storage."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from lightning_fed.channel import Channel, StorageError
from lightning_fed.testing import s3_storage_options
from tests.channel.helpers import Federation
from tests.conftest import Backend


@pytest.fixture
def local(tmp_path: Path) -> Backend:
    return Backend("file", (tmp_path / "fed").as_uri())


@pytest.fixture
def fed() -> Federation:
    return Federation.make("agg", "c1", "c2")


def test_fifo_in_the_inbox_is_rejected_without_blocking(
    local: Backend, fed: Federation, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agg = fed.channel(local, "agg")
    inbox = tmp_path / "fed" / "task-1" / "inbox" / "agg" / "c1"
    inbox.mkdir(parents=True)
    os.mkfifo(inbox / f"{1:020d}-update.msg")
    with caplog.at_level(logging.WARNING):
        assert agg.poll() == []
    assert any("not a regular file" in r.reason for r in agg.rejections)


def test_symlink_planted_in_the_storage_cannot_redirect_writes(
    local: Backend, fed: Federation, tmp_path: Path
) -> None:
    agg = fed.channel(local, "agg")
    outside = tmp_path / "outside"
    outside.mkdir()
    inbox = tmp_path / "fed" / "task-1" / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "c2").symlink_to(outside, target_is_directory=True)
    threads = threading.active_count()
    with pytest.raises(StorageError, match="outside the root"):
        agg.send("weights", {}, to="c2", tensors={"w": torch.ones(4)})
    assert list(outside.iterdir()) == []
    assert threading.active_count() == threads  # no hashing thread left behind


def test_symlinked_envelope_is_not_followed(
    local: Backend, fed: Federation, tmp_path: Path
) -> None:
    agg = fed.channel(local, "agg")
    secret = tmp_path / "secret.txt"
    secret.write_text("{}")
    inbox = tmp_path / "fed" / "task-1" / "inbox" / "agg" / "c1"
    inbox.mkdir(parents=True)
    (inbox / f"{1:020d}-update.msg").symlink_to(secret)
    assert agg.poll() == []
    assert any("unreadable" in r.reason or "regular" in r.reason for r in agg.rejections)


def test_leftover_temp_files_are_invisible_and_removed_with_the_task(
    local: Backend, fed: Federation, tmp_path: Path
) -> None:
    agg = fed.channel(local, "agg")
    inbox = tmp_path / "fed" / "task-1" / "inbox" / "agg" / "c1"
    inbox.mkdir(parents=True)
    (inbox / ".tmp-0123").write_bytes(b"half a mess")
    assert agg.poll() == [] and agg.rejections == []
    agg.destroy_task()
    assert not (tmp_path / "fed" / "task-1").exists()


def test_missing_bucket_is_a_storage_error_at_connect(s3_endpoint: str, fed: Federation) -> None:
    ch = Channel(
        "s3://no-such-bucket-here/fed",
        fed.task,
        fed.identities["agg"],
        storage_options=s3_storage_options(s3_endpoint),
    )
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        ch.connect()
