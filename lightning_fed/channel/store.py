"""Atomic publish, fresh listing and reads over any fsspec filesystem.

This is the only module that talks to fsspec. It knows nothing about messages:
it publishes complete byte strings under relative keys, lists keys under a
prefix without trusting any listing cache, reads and deletes.

Publishing is atomic: a reader sees either nothing or the complete object.

- Local (and NFS) directories: write a temporary file in the *same* directory,
  flush, fsync, then ``os.replace`` it onto the final name and fsync the directory.
- SFTP/SSH: write a temporary file in the same directory, then rename it.
- Object stores (S3, GCS, Azure, memory): one ``pipe`` of the complete bytes,
  which is a single PUT (or a multipart upload, which only appears on completion).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import posixpath
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_fed.channel.errors import ConfigError

TEMP_PREFIX = ".tmp-"
# Where a single put of the whole object is atomic (object stores, in-process memory).
PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
# Where a rename within one directory is atomic.
RENAME_PROTOCOLS = frozenset({"sftp", "ssh", "smb", "hdfs", "webhdfs", "arrow_hdfs"})


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    proto = fs.protocol
    return {proto} if isinstance(proto, str) else set(proto)


class Store:
    """Byte objects under a root URL, published atomically.

    Args:
        url: any fsspec URL or local path (``file:///tmp/fl``, ``s3://bucket/fl``,
            ``memory://fl``...).
        storage_options: passed to the fsspec filesystem (credentials, ``endpoint_url``...).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)
        protocols = _protocols(self.fs)
        self.rename_publish = bool(protocols & RENAME_PROTOCOLS)
        if not (self.local or self.rename_publish or protocols & PUT_PROTOCOLS):
            raise ConfigError(
                f"storage URL {url!r} uses protocol {'/'.join(sorted(protocols))!r}, which the "
                "channel cannot publish atomically on; supported: local paths and file://, "
                f"{', '.join(sorted(PUT_PROTOCOLS | RENAME_PROTOCOLS))}; hint: use one of those"
            )

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def path(self, key: str) -> str:
        """The filesystem path of a relative key."""
        return posixpath.join(self.root, key) if key else self.root

    def key(self, path: str) -> str:
        """The relative key of a filesystem path returned by a listing."""
        path = self.fs._strip_protocol(path)
        root = self.fs._strip_protocol(self.root).rstrip("/")
        if path == root:
            return ""
        if not path.startswith(root + "/"):
            raise ValueError(f"{path!r} is not under {root!r}")
        return path[len(root) + 1 :]

    def publish(self, key: str, data: bytes | Sequence[memoryview | bytes]) -> None:
        """Make ``data`` visible under ``key`` all at once (see the module docstring).

        Args:
            key: the relative key.
            data: the bytes, or a sequence of chunks to be stored back to back (written
                one by one to local files, joined into one PUT for object stores).
        """
        path = self.path(key)
        chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else data
        if self.local:
            self._publish_local(path, chunks)
            return
        whole = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self.rename_publish:
            parent = posixpath.dirname(path)
            tmp = posixpath.join(parent, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
            self.fs.makedirs(parent, exist_ok=True)
            self.fs.pipe_file(tmp, bytes(whole))
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, bytes(whole))

    @staticmethod
    def _publish_local(path: str, chunks: Sequence[memoryview | bytes]) -> None:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def list_keys(self, prefix: str) -> list[str]:
        """All published keys under ``prefix`` (recursively), sorted, freshly listed.

        Temporary files of publishes still under way (or killed) are left out.
        """
        path = self.path(prefix)
        if self.local:
            return self._list_local(path)
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return []
        keys = []
        for p, info in found.items():
            # s3fs's find falls back to info(path) on an empty listing, which can race
            # with a new object and report the prefix itself as a directory: skip it.
            if info.get("type") != "file":
                continue
            k = self.key(p)
            if not posixpath.basename(k).startswith(TEMP_PREFIX):
                keys.append(k)
        return sorted(keys)

    def _list_local(self, path: str) -> list[str]:
        keys = []
        base = self.fs._strip_protocol(self.root).rstrip("/")
        for dirpath, _dirs, files in os.walk(path):
            rel = os.path.relpath(dirpath, base).replace(os.sep, "/")
            for name in files:
                if not name.startswith(TEMP_PREFIX):
                    keys.append(name if rel == "." else f"{rel}/{name}")
        return sorted(keys)

    def read(self, key: str) -> bytes:
        """The bytes under ``key``; raises FileNotFoundError if there are none."""
        path = self.path(key)
        if self.local:
            with open(path, "rb") as fh:
                return fh.read()
        return bytes(self.fs.cat_file(path))

    def read_into(
        self, key: str, buffer: bytearray | mmap.mmap, chunk: int = 4 << 20
    ) -> Iterator[memoryview]:
        """Fill ``buffer`` with the object under ``key``, yielding each filled slice.

        The caller can process (hash) each slice while the next one is read.

        Raises:
            FileNotFoundError: if nothing is stored under ``key``.
            ValueError: if the object is not exactly ``len(buffer)`` bytes long.
        """
        view = memoryview(buffer)
        if not self.local:
            # A ranged read: never download more than one byte past the expected size.
            data = bytes(self.fs.cat_file(self.path(key), start=0, end=len(buffer) + 1))
            if len(data) != len(buffer):
                raise ValueError(f"has {len(data)} bytes, expected {len(buffer)}")
            view[:] = data
            yield view
            return
        with open(self.path(key), "rb", buffering=0) as fh:
            done = 0
            while done < len(buffer):
                n = fh.readinto(view[done : done + chunk])
                if not n:
                    raise ValueError(f"has {done} bytes, expected {len(buffer)}")
                yield view[done : done + n]
                done += n
            extra = len(fh.read(1))
            if extra:
                raise ValueError(f"has more than the expected {len(buffer)} bytes")

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        path = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)
        if not self.local:
            self.fs.invalidate_cache(posixpath.dirname(path))

    def delete_tree(self, prefix: str) -> None:
        """Remove everything under ``prefix`` (a missing prefix is not an error)."""
        path = self.path(prefix)
        self.fs.invalidate_cache(path)
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)
