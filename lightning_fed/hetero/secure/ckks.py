"""CKKS with TenSEAL: parameters at 128-bit security, the two parties' keys, the evaluator.

The collaborator makes a :class:`SecretKeys` (a private TenSEAL context: it encrypts
its features and noise and decrypts the host's results) and hands the host
:meth:`SecretKeys.public_bytes` and :meth:`SecretKeys.galois_bytes` only. The host
loads them into a :class:`CKKSEvaluator`, whose TenSEAL context is public
(``is_private()`` is false): it can multiply by plain values, add and rotate, never
decrypt. The evaluator implements :class:`~.packing.SlotOps` on SEAL ciphertexts
through TenSEAL's SEAL bindings (``tenseal.sealapi``), which expose the rotations
the packed products need.

Ciphertexts travel as SEAL's own serialisation (compressed; a fresh one from the
collaborator is *seeded*, about half the size).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from lightning_fed.errors import SettingError

try:
    import tenseal as ts
    import tenseal.sealapi as seal
except ImportError as exc:  # pragma: no cover - the secure extra is installed in tests
    raise ImportError(
        f"secure HeteroNN needs TenSEAL ({exc}); hint: pip install 'lightning-fed[secure]'"
    ) from exc

Vector = NDArray[np.float64]

#: Largest total coefficient-modulus bits for 128-bit classical security, by
#: polynomial modulus degree (HomomorphicEncryption.org security standard, table 1;
#: the bounds SEAL enforces as ``sec_level_type.tc128``).
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


class CKKSError(SettingError):
    """Bad CKKS parameters, or keys and ciphertexts that do not fit them."""


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters of the secure interactive layer (the collaborator's choice).

    The layer needs one multiplication by a plain value, so one rescale: the first
    prime holds the result (its bits above ``scale_bits`` are the headroom for the
    values' magnitude), the middle prime is divided out by the rescale (it should be
    about ``scale_bits``), and the last is the special prime of key switching.

    Args:
        poly_modulus_degree: N; a ciphertext holds N/2 values.
        coeff_mod_bit_sizes: bits of each coefficient-modulus prime; their sum must
            not exceed the 128-bit bound for N (:data:`MAX_COEFF_BITS_128`).
        scale_bits: log2 of the encoding scale (precision is about 2^-(scale_bits - 10)).
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        bound = MAX_COEFF_BITS_128.get(self.poly_modulus_degree)
        if bound is None:
            raise CKKSError(
                f"poly_modulus_degree={self.poly_modulus_degree} is not one of "
                f"{sorted(MAX_COEFF_BITS_128)}"
            )
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 3:
            raise CKKSError(
                f"coeff_mod_bit_sizes={list(bits)}: the layer needs at least 3 primes (result, "
                "rescale, special); hint: the default (60, 40, 60)"
            )
        if sum(bits) > bound:
            raise CKKSError(
                f"coeff_mod_bit_sizes={list(bits)} sum to {sum(bits)} bits, above the "
                f"{bound} bits that keep N={self.poly_modulus_degree} at 128-bit security; "
                "hint: use fewer or smaller primes, or a larger poly_modulus_degree"
            )
        if not 20 <= self.scale_bits < bits[0]:
            raise CKKSError(
                f"scale_bits={self.scale_bits} must be at least 20 and below the first "
                f"prime's {bits[0]} bits (the headroom for the values)"
            )

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CKKSParams:
        try:
            return cls(**values)
        except TypeError as exc:
            raise CKKSError(f"malformed CKKS parameters {values!r}: {exc}") from None


@dataclass
class _Scratch:
    """SEAL's bindings save and load through file paths: a private folder for that."""

    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lf-ckks-")))

    def dump(self, save: Callable[[str], None]) -> bytes:
        path = self.folder / "obj"
        save(str(path))
        return path.read_bytes()

    def load(self, load: Callable[[str], None], data: bytes) -> None:
        path = self.folder / "obj"
        path.write_bytes(data)
        load(str(path))

    def __del__(self) -> None:
        try:
            for child in self.folder.iterdir():
                child.unlink()
            self.folder.rmdir()
        except OSError:
            pass


def galois_element(step: int, params: CKKSParams) -> int:
    """SEAL's Galois element of a left rotation by ``step`` slots: ``3^step mod 2N``."""
    return pow(3, step % params.slots, 2 * params.poly_modulus_degree)


class _Codec:
    """Encoding and (de)serialisation shared by both parties."""

    def __init__(self, context: ts.Context, params: CKKSParams) -> None:
        self.context = context
        self.params = params
        self.seal = context.seal_context().data
        self.encoder = seal.CKKSEncoder(self.seal)
        self.scale = 2.0**params.scale_bits
        self._scratch = _Scratch()

    def encode(self, values: Vector, parms_id: Any, scale: float) -> seal.Plaintext:
        plain = seal.Plaintext()
        self.encoder.encode(np.ascontiguousarray(values, dtype=np.float64), parms_id, scale, plain)
        return plain

    def to_bytes(self, ciphertext: seal.Ciphertext) -> bytes:
        return self._scratch.dump(ciphertext.save)

    def from_bytes(self, data: bytes) -> seal.Ciphertext:
        ciphertext = seal.Ciphertext()
        try:
            self._scratch.load(lambda path: ciphertext.load(self.seal, path), data)
        except (RuntimeError, ValueError) as exc:
            raise CKKSError(f"not a ciphertext of these CKKS parameters: {exc}") from None
        return ciphertext


class SecretKeys(_Codec):
    """The collaborator's CKKS keys: encrypt, decrypt, and what to give the host.

    Args:
        params: the CKKS parameters.
        rotation_steps: the rotations the host will make (Galois keys for each).
    """

    def __init__(self, params: CKKSParams, rotation_steps: Sequence[int]) -> None:
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            n_threads=1,
        )
        context.global_scale = 2.0**params.scale_bits
        super().__init__(context, params)
        secret = context.secret_key().data
        self.rotation_steps = sorted({int(s) % params.slots for s in rotation_steps} - {0})
        self._encryptor = seal.Encryptor(self.seal, secret)
        self._decryptor = seal.Decryptor(self.seal, secret)
        self._keygen = seal.KeyGenerator(self.seal, secret)

    def public_bytes(self) -> bytes:
        """The public context (parameters and public key; no secret key)."""
        public = self.context.copy()
        public.make_context_public()
        data: bytes = public.serialize(save_public_key=True, save_secret_key=False)
        return data

    def galois_bytes(self) -> bytes:
        """Galois keys for :attr:`rotation_steps` (they let the host rotate, not decrypt)."""
        keys = seal.GaloisKeys()
        elements = [galois_element(s, self.params) for s in self.rotation_steps]
        self._keygen.create_galois_keys(elements, keys)
        return self._scratch.dump(keys.save)

    def encrypt(self, values: Vector) -> bytes:
        """One seeded ciphertext of ``values`` (at most ``slots`` of them)."""
        if values.size > self.params.slots:
            raise CKKSError(f"{values.size} values for {self.params.slots} slots")
        plain = self.encode(values, self.seal.first_parms_id(), self.scale)
        return self._scratch.dump(self._encryptor.encrypt_symmetric(plain).save)

    def decrypt(self, data: bytes) -> Vector:
        """The slot values of a ciphertext the host returned."""
        ciphertext = self.from_bytes(data)
        plain = seal.Plaintext()
        try:
            self._decryptor.decrypt(ciphertext, plain)
        except (RuntimeError, ValueError) as exc:
            raise CKKSError(f"cannot decrypt the host's ciphertext: {exc}") from None
        return np.asarray(self.encoder.decode_double(plain), dtype=np.float64)


class CKKSEvaluator(_Codec):
    """The host's side: a public context and Galois keys; a :class:`SlotOps` backend.

    Raises :class:`CKKSError` if ``public`` holds a secret key, or if its parameters
    are not the ``params`` agreed (or not 128-bit secure).
    """

    def __init__(self, public: bytes, galois: bytes, params: CKKSParams) -> None:
        try:
            context = ts.context_from(public)
        except Exception as exc:  # TenSEAL raises bare exceptions on bad buffers
            raise CKKSError(f"the collaborator's public context is unreadable: {exc}") from None
        if context.is_private():
            raise CKKSError(
                "the collaborator sent a context holding its secret key; the host refuses it "
                "(it must never be able to decrypt the collaborator's features)"
            )
        super().__init__(context, params)
        got = self.seal.key_context_data().parms()
        degree = got.poly_modulus_degree()
        bits = [q.bit_count() for q in got.coeff_modulus()]
        if degree != params.poly_modulus_degree or bits != list(params.coeff_mod_bit_sizes):
            raise CKKSError(
                f"the public context has N={degree}, primes of {bits} bits, but the agreed "
                f"parameters are N={params.poly_modulus_degree}, {list(params.coeff_mod_bit_sizes)}"
            )
        self.galois = seal.GaloisKeys()
        try:
            self._scratch.load(lambda path: self.galois.load(self.seal, path), galois)
        except (RuntimeError, ValueError) as exc:
            raise CKKSError(f"the collaborator's Galois keys are unreadable: {exc}") from None
        self.evaluator = seal.Evaluator(self.seal)
        self._encryptor = seal.Encryptor(self.seal, context.public_key().data)
        self.slots = params.slots

    # -- SlotOps ----------------------------------------------------------------------
    def rotate(self, x: seal.Ciphertext, step: int) -> seal.Ciphertext:
        out = seal.Ciphertext()
        try:
            self.evaluator.rotate_vector(x, step, self.galois, out)
        except (RuntimeError, ValueError) as exc:
            raise CKKSError(f"cannot rotate by {step}: {exc} (no Galois key for it?)") from None
        return out

    def dot(self, terms: Sequence[tuple[seal.Ciphertext, Vector]]) -> seal.Ciphertext:
        total: seal.Ciphertext | None = None
        for x, values in terms:
            product = seal.Ciphertext()
            self.evaluator.multiply_plain(x, self.encode(values, x.parms_id(), self.scale), product)
            if total is None:
                total = product
            else:
                self.evaluator.add_inplace(total, product)
        if total is None:
            raise ValueError("dot() of no terms")
        self.evaluator.rescale_to_next_inplace(total)
        return total

    def add(self, x: seal.Ciphertext, y: seal.Ciphertext) -> seal.Ciphertext:
        out = seal.Ciphertext()
        self.evaluator.add(x, y, out)
        return out

    def zeros(self) -> seal.Ciphertext:
        out = seal.Ciphertext()
        plain = self.encode(np.zeros(self.slots), self.seal.first_parms_id(), self.scale)
        self._encryptor.encrypt(plain, out)
        return out

    # -- more -------------------------------------------------------------------------
    def add_plain(self, x: seal.Ciphertext, values: Vector) -> seal.Ciphertext:
        """``x + values`` (encoded at ``x``'s level and scale)."""
        out = seal.Ciphertext()
        self.evaluator.add_plain(x, self.encode(values, x.parms_id(), x.scale), out)
        return out

    def check_fresh(self, x: seal.Ciphertext, what: str) -> None:
        """Refuse a ciphertext that is not a fresh one of these parameters."""
        first = self.seal.first_parms_id()
        if x.parms_id() != first or x.size() != 2 or abs(x.scale / self.scale - 1) > 1e-9:
            raise CKKSError(
                f"{what} is not a fresh ciphertext of the agreed parameters "
                f"(size {x.size()}, scale 2^{np.log2(x.scale):.1f})"
            )
