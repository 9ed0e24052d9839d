"""Key agreement and authenticated encryption for secure aggregation.

Each client makes two fresh X25519 key pairs per round: one to agree the keys that
encrypt Shamir shares to its neighbours (relayed by the aggregator, who must not read
them), one to agree the seeds of the pairwise masks. Agreed secrets go through
HKDF-SHA256 with a label and the round's context, so no two uses share a key.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_BYTES = 32
NONCE_BYTES = 12
MASK_LABEL = b"lightning_fed secagg pairwise mask"
SHARE_LABEL = b"lightning_fed secagg share encryption"


class KeyPair:
    """An X25519 key pair whose private half can be Shamir-shared (32 raw bytes)."""

    def __init__(self, private: bytes | None = None) -> None:
        self._private = (
            X25519PrivateKey.generate()
            if private is None
            else X25519PrivateKey.from_private_bytes(private)
        )
        self.public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def private_bytes(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def agree(self, peer_public: bytes, label: bytes, context: bytes) -> bytes:
        """A 32-byte key shared with the owner of ``peer_public`` for ``label``/``context``.

        Raises:
            ValueError: ``peer_public`` is not an X25519 public key.
        """
        if len(peer_public) != KEY_BYTES:
            raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(peer_public)}")
        secret = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=label + b"|" + context).derive(
            secret
        )


def public_of(private: bytes) -> bytes:
    """The public key of a raw X25519 private key (to check a reconstructed one)."""
    return KeyPair(private).public


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: a fresh nonce followed by the ciphertext and its tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def unseal(key: bytes, sealed: bytes, associated: bytes) -> bytes | None:
    """The plaintext of :func:`seal`'s output, or None if it was not sealed with ``key``
    for ``associated`` (tampered, truncated, or meant for someone else)."""
    if len(sealed) < NONCE_BYTES + 16:
        return None
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag:
        return None
