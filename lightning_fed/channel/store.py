"""Atomic publish, fresh listing and reads over any fsspec filesystem.

This is the only module that talks to fsspec. It knows nothing about messages:
it publishes complete byte strings under relative keys, lists keys under a
prefix without trusting any listing cache, reads and deletes.

Publishing is atomic: a reader sees either nothing or the complete object.

- Local (and NFS) directories: write a temporary file in the *same* directory,
  flush, fsync, then ``os.replace`` it onto the final name and fsync the directory.
- SFTP/SSH/SMB/HDFS: write a temporary file in the same directory, then rename it.
- Object stores (S3, GCS, Azure, memory): one ``pipe`` of the complete bytes,
  which is a single PUT (or a multipart upload, which only appears on completion).

Every failure of the storage itself (unreachable endpoint, missing bucket, denied
access) is raised as :class:`~lightning_fed.channel.errors.StorageError` naming the
operation and key; a missing object is a plain ``FileNotFoundError``.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import posixpath
import re
import stat
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightning_fed.channel.errors import ChannelError, ConfigError, StorageError

TEMP_PREFIX = ".tmp-"
# Where a single put of the whole object is atomic (object stores, in-process memory).
PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
# Where a rename within one directory is atomic.
RENAME_PROTOCOLS = frozenset({"sftp", "ssh", "smb", "hdfs", "webhdfs", "arrow_hdfs"})
_BUCKET_PROTOCOLS = PUT_PROTOCOLS - {"memory"}
#: A first path part such as ``s3:`` or ``gs:bucket``: a URL scheme whose ``//`` is missing.
_SCHEME_LIKE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]+):(.*)")

T = TypeVar("T")


def check_url(url: object) -> str:
    """``url`` if it can name a storage location, else a :class:`ConfigError`.

    A local path whose first part looks like a URL scheme (``s3:/bucket/fl`` with one
    slash, ``gs:bucket``) is refused: fsspec would make a local folder named ``s3:``,
    and every party would wait there alone until its timeout.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(
            f"channel must be a storage URL or a Channel, got {url!r}; hint: "
            "channel='s3://bucket/federation' or a local folder"
        )
    if "://" in url or "::" in url:
        return url  # a URL (or an fsspec chain such as simplecache::s3://...)
    first = url.replace("\\", "/").split("/")[0]
    scheme = _SCHEME_LIKE.fullmatch(first)
    if scheme is not None:
        rest = url[len(scheme.group(1)) + 1 :].lstrip("/")
        raise ConfigError(
            f"channel {url!r} is a local path whose first part {first!r} looks like a URL "
            f"scheme with its '//' missing, so every party would wait in a local folder named "
            f"{first!r}; hint: channel='{scheme.group(1)}://{rest}'"
        )
    return url


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
        self.url = check_url(url)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        except (ValueError, ImportError) as exc:
            raise ConfigError(
                f"cannot open storage URL {url!r}: {exc}; hint: check the URL's protocol and "
                "install its fsspec backend (e.g. pip install 'lightning-fed[s3]' for s3://)"
            ) from exc
        self.root = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)
        self.protocols = _protocols(self.fs)
        self.rename_publish = bool(self.protocols & RENAME_PROTOCOLS)
        if not (self.local or self.rename_publish or self.protocols & PUT_PROTOCOLS):
            raise ConfigError(
                f"storage URL {url!r} uses protocol {'/'.join(sorted(self.protocols))!r}, which "
                "the channel cannot publish atomically on; supported: local paths and file://, "
                f"{', '.join(sorted(PUT_PROTOCOLS | RENAME_PROTOCOLS))}; hint: use one of those"
            )
        self._real_root = os.path.realpath(self.root) if self.local else ""

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- helpers -----------------------------------------------------------------
    def _guard(self, operation: str, key: str, call: Callable[[], T]) -> T:
        """Run a storage call; turn storage failures into :class:`StorageError`."""
        try:
            return call()
        except (FileNotFoundError, ChannelError, ValueError):
            raise
        except Exception as exc:  # botocore, aiohttp, paramiko... errors are not OSErrors
            raise StorageError(operation, key, self.url, exc) from exc

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

    def _inside(self, directory: str) -> None:
        """Refuse local paths that a symlink leads outside the root."""
        real = os.path.realpath(directory)
        if real != self._real_root and not real.startswith(self._real_root + os.sep):
            raise StorageError(
                "use",
                directory,
                self.url,
                PermissionError(f"it resolves to {real}, outside the root"),
            )

    def _forget(self, path: str) -> None:
        """Drop every cached listing at, above and below ``path``.

        fsspec's own ``invalidate_cache`` drops ``path`` and its parents only; cached
        listings of sub-folders would still hide new objects (s3fs even consults the
        parent's cached listing before reading an object).
        """
        self.fs.invalidate_cache(path)
        cache = getattr(self.fs, "dircache", None)
        if cache:
            below = self.fs._strip_protocol(path).rstrip("/") + "/"
            for cached in [k for k in list(cache) if k.startswith(below)]:
                cache.pop(cached, None)

    # -- operations --------------------------------------------------------------
    def check(self) -> None:
        """Make sure the root can be used: create a local root, find an object store's bucket.

        Raises:
            StorageError: naming the URL and what failed.
        """
        if self.local:
            self._guard("create", "", lambda: os.makedirs(self.root, exist_ok=True))
            self._real_root = os.path.realpath(self.root)
        elif self.protocols & _BUCKET_PROTOCOLS:
            bucket = self.fs._strip_protocol(self.root).split("/")[0]
            self._forget(bucket)
            if not self._guard("find bucket", bucket, lambda: self.fs.exists(bucket)):
                raise StorageError(
                    "find bucket",
                    bucket,
                    self.url,
                    FileNotFoundError("no such bucket, or the endpoint did not answer"),
                    hint=f"the bucket must exist before any party starts: the task initiator "
                    f"makes it once (`lightning-fed check {self.url} --create-bucket`, or the "
                    "provider's console or CLI), and every organisation's credentials must "
                    "allow listing, reading, writing and deleting under the URL",
                )

    @property
    def bucket(self) -> str | None:
        """The bucket of an object-store URL (None for local folders and ``memory://``)."""
        if self.protocols & _BUCKET_PROTOCOLS:
            return str(self.fs._strip_protocol(self.root).split("/")[0])
        return None

    def create_bucket(self) -> bool:
        """Create the URL's bucket if it does not exist; True when it was created."""
        bucket = self.bucket
        if bucket is None:
            return False
        self._forget(bucket)
        if self._guard("find bucket", bucket, lambda: self.fs.exists(bucket)):
            return False
        self._guard("create bucket", bucket, lambda: self.fs.mkdir(bucket))
        return True

    def publish(
        self, key: str, data: bytes | Sequence[memoryview | bytes], *, durable: bool = True
    ) -> None:
        """Make ``data`` visible under ``key`` all at once (see the module docstring).

        Args:
            key: the relative key.
            data: the bytes, or a sequence of chunks to be stored back to back (written
                one by one to local files, joined into one PUT for object stores).
            durable: on a local file system, flush the file and its folder to disk
                (fsync) before returning. False keeps the all-at-once visibility but
                may lose the file if the machine (not the process) crashes: for
                short-lived messages that a restart regenerates anyway.
        """
        path = self.path(key)
        chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else data
        if self.local:
            self._guard("publish", key, lambda: self._publish_local(path, chunks, durable))
            return
        whole = bytes(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if self.rename_publish:
            parent = posixpath.dirname(path)
            tmp = posixpath.join(parent, f"{TEMP_PREFIX}{uuid.uuid4().hex}")

            def rename() -> None:
                self.fs.makedirs(parent, exist_ok=True)
                self.fs.pipe_file(tmp, whole)
                self.fs.mv(tmp, path)

            self._guard("publish", key, rename)
        else:
            self._guard("publish", key, lambda: self.fs.pipe_file(path, whole))

    def _publish_local(
        self, path: str, chunks: Sequence[memoryview | bytes], durable: bool = True
    ) -> None:
        parent = os.path.dirname(path)
        self._inside(parent)  # before creating folders through a planted symlink
        os.makedirs(parent, exist_ok=True)
        self._inside(parent)
        tmp = os.path.join(parent, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        if not durable:
            return
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def list_keys(self, prefix: str) -> list[str]:
        """All published keys under ``prefix`` (recursively), sorted, freshly listed.

        Temporary files of publishes still under way (or killed) are left out. A prefix
        with nothing under it gives an empty list.
        """
        path = self.path(prefix)
        if self.local:
            return self._guard("list", prefix, lambda: self._list_local(path))

        def find() -> dict[str, Any]:
            self._forget(path)
            try:
                return dict(self.fs.find(path, detail=True))
            except FileNotFoundError:
                return {}

        keys = []
        for p, info in self._guard("list", prefix, find).items():
            # s3fs's find falls back to info(path) on an empty listing, which can race
            # with a new object and report the prefix itself as a directory: skip it.
            if info.get("type") != "file":
                continue
            k = self.key(p)
            if not posixpath.basename(k).startswith(TEMP_PREFIX):
                keys.append(k)
        return sorted(keys)

    def _list_local(self, path: str) -> list[str]:
        if not os.path.isdir(path):
            return []

        def fail(exc: OSError) -> None:
            raise exc

        keys = []
        base = self.fs._strip_protocol(self.root).rstrip("/")
        for dirpath, _dirs, files in os.walk(path, onerror=fail):  # never follows links
            rel = os.path.relpath(dirpath, base).replace(os.sep, "/")
            for name in files:
                if not name.startswith(TEMP_PREFIX):
                    keys.append(name if rel == "." else f"{rel}/{name}")
        return sorted(keys)

    def read(self, key: str, limit: int | None = None) -> bytes:
        """The bytes under ``key``.

        Args:
            key: the relative key.
            limit: the most bytes accepted; larger objects raise ``ValueError``
                without being read whole.

        Raises:
            FileNotFoundError: if nothing is stored under ``key``.
            ValueError: if the object is larger than ``limit`` or, locally, is not a
                regular file (a FIFO, device or symlink is never opened for reading).
        """
        path = self.path(key)
        if self.local:
            return self._guard("read", key, lambda: self._read_local(path, limit))

        def cat() -> bytes:
            self._forget(path)
            if limit is None:
                return bytes(self.fs.cat_file(path))
            return bytes(self.fs.cat_file(path, start=0, end=limit + 1))

        data = self._guard("read", key, cat)
        if limit is not None and len(data) > limit:
            raise ValueError(f"is larger than {limit} bytes")
        return data

    @staticmethod
    def _open_regular(path: str) -> int:
        """Open a regular file for reading, never a symlink, FIFO or device."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ValueError("is a symbolic link") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError("is not a regular file")
        return fd

    def _read_local(self, path: str, limit: int | None) -> bytes:
        with os.fdopen(self._open_regular(path), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if limit is not None and size > limit:
                raise ValueError(f"is {size} bytes, larger than {limit}")
            data = fh.read() if limit is None else fh.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise ValueError(f"is larger than {limit} bytes")
        return data

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
            data = self.read(key, limit=len(buffer))
            if len(data) != len(buffer):
                raise ValueError(f"has {len(data)} bytes, expected {len(buffer)}")
            view[:] = data
            yield view
            return
        path = self.path(key)
        fd = self._guard("read", key, lambda: self._open_regular(path))
        with os.fdopen(fd, "rb", buffering=0) as fh:
            done = 0
            while done < len(buffer):
                n = self._guard("read", key, partial(fh.readinto, view[done : done + chunk]))
                if not n:
                    raise ValueError(f"has {done} bytes, expected {len(buffer)}")
                yield view[done : done + n]
                done += n
            if fh.read(1):
                raise ValueError(f"has more than the expected {len(buffer)} bytes")

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        path = self.path(key)

        def rm() -> None:
            if self.local:
                self._inside(os.path.dirname(path))
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)
            if not self.local:
                self._forget(posixpath.dirname(path))

        self._guard("delete", key, rm)

    def delete_tree(self, prefix: str) -> None:
        """Remove everything under ``prefix`` (a missing prefix is not an error)."""
        path = self.path(prefix)

        def rm() -> None:
            self._forget(path)
            with contextlib.suppress(FileNotFoundError):
                if self.fs.exists(path):
                    self.fs.rm(path, recursive=True)
            self._forget(path)

        self._guard("delete", prefix, rm)
