"""Ed25519 identities of nodes and the task configuration that lists them.

Every node signs what it sends with its own private key. Peers' public keys are
part of the *task configuration*, which each party receives out of band (never
from the shared storage, whose operator must not be able to swap keys).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from lightning_fed.channel.errors import ConfigError
from lightning_fed.channel.names import validate_name

PRIVATE_KEY_SUFFIX = ".key"
PUBLIC_KEY_SUFFIX = ".pub"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def public_key_from_text(text: str, node_id: str = "?") -> Ed25519PublicKey:
    """Decode a base64 raw Ed25519 public key, with a clear error when it is malformed."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except Exception as exc:  # binascii.Error, ValueError
        raise ConfigError(
            f"public key of node {node_id!r} is not a base64 raw Ed25519 key "
            f"(32 bytes): {text!r}; hint: copy it from the node's {PUBLIC_KEY_SUFFIX} file "
            "made by `lightning-fed keys new`"
        ) from exc


def public_key_text(key: Ed25519PublicKey) -> str:
    """Encode a public key as base64 of its 32 raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _b64(raw)


@dataclass(frozen=True)
class NodeIdentity:
    """A node id together with its private signing key."""

    node_id: str
    private_key: Ed25519PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        validate_name(self.node_id, "node id")

    @classmethod
    def generate(cls, node_id: str) -> NodeIdentity:
        """Make a fresh identity with a new random Ed25519 key."""
        return cls(node_id, Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike[str], node_id: str | None = None) -> NodeIdentity:
        """Load a private key written by :meth:`save` (PEM, PKCS#8).

        Args:
            path: the key file.
            node_id: the node's id; by default the file name without its suffix.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read private key file {str(path)!r}: {exc.strerror}; "
                "hint: make one with `lightning-fed keys new NODE_ID`"
            ) from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{str(path)!r} is not an unencrypted PEM private key; "
                "hint: make one with `lightning-fed keys new NODE_ID`"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(
                f"{str(path)!r} holds a {type(key).__name__}, not an Ed25519 private key"
            )
        return cls(node_id or path.name.removesuffix(PRIVATE_KEY_SUFFIX), key)

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public half of the key."""
        return self.private_key.public_key()

    @property
    def public_key_text(self) -> str:
        """The public key as base64 text, as it appears in a task configuration."""
        return public_key_text(self.public_key)

    def sign(self, data: bytes) -> bytes:
        """Sign ``data``; the signature is 64 bytes."""
        return self.private_key.sign(data)

    def save(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``NODE.key`` (mode 0600) and ``NODE.pub`` into ``directory``.

        Returns:
            The paths of the private and the public key file.

        Raises:
            ConfigError: if the private key file exists already (keys are never overwritten).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        private_path = directory / f"{self.node_id}{PRIVATE_KEY_SUFFIX}"
        public_path = directory / f"{self.node_id}{PUBLIC_KEY_SUFFIX}"
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError as exc:
            raise ConfigError(
                f"private key {str(private_path)!r} exists already; keys are never overwritten; "
                "hint: delete it first if you really mean to replace this node's identity"
            ) from exc
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        public_path.write_text(self.public_key_text + "\n", encoding="ascii")
        return private_path, public_path


@dataclass(frozen=True)
class TaskConfig:
    """What every party of a task agrees on: the task id and each node's public key.

    Args:
        task_id: the task's name; also the folder of its storage under the channel URL.
        nodes: node id -> base64 raw Ed25519 public key.
    """

    task_id: str
    nodes: Mapping[str, str]

    def __post_init__(self) -> None:
        validate_name(self.task_id, "task id")
        if not self.nodes:
            raise ConfigError(
                f"task {self.task_id!r} lists no nodes; hint: add every party's public key"
            )
        for node_id, text in self.nodes.items():
            validate_name(node_id, "node id")
            public_key_from_text(text, node_id)

    @property
    def node_ids(self) -> list[str]:
        """All node ids of the task, sorted."""
        return sorted(self.nodes)

    def public_key(self, node_id: str) -> Ed25519PublicKey | None:
        """The public key of ``node_id``, or None if it is not part of the task."""
        text = self.nodes.get(node_id)
        return None if text is None else public_key_from_text(text, node_id)

    def verify(self, node_id: str, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` is ``node_id``'s valid signature of ``data``."""
        key = self.public_key(node_id)
        if key is None:
            return False
        try:
            key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def to_json(self) -> str:
        """Serialise as JSON (``{"task_id": ..., "nodes": {...}}``)."""
        return json.dumps({"task_id": self.task_id, "nodes": dict(self.nodes)}, indent=2)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the configuration as JSON to ``path``."""
        path = Path(path)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TaskConfig:
        """Read a configuration written by :meth:`save` or ``lightning-fed keys task``."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read task configuration {str(path)!r}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"task configuration {str(path)!r} is not JSON: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
            raise ConfigError(
                f"task configuration {str(path)!r} must be an object with 'task_id' and "
                "'nodes' (node id -> public key)"
            )
        if not isinstance(data.get("task_id"), str):
            raise ConfigError(f"task configuration {str(path)!r} has no string 'task_id'")
        return cls(task_id=data["task_id"], nodes=data["nodes"])

    @classmethod
    def from_public_key_files(cls, task_id: str, paths: list[str | os.PathLike[str]]) -> TaskConfig:
        """Build a configuration from ``NODE.pub`` files (node id = file name)."""
        nodes: dict[str, str] = {}
        for p in map(Path, paths):
            node_id = p.name.removesuffix(PUBLIC_KEY_SUFFIX)
            try:
                nodes[node_id] = p.read_text(encoding="ascii").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read public key file {str(p)!r}: {exc}") from exc
        return cls(task_id=task_id, nodes=nodes)
