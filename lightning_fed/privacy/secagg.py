"""SecAgg+ (Bell et al., CCS 2020, over Bonawitz et al., CCS 2017): the protocol's two
sides as state machines, apart from any transport.

One round, with ``context`` naming it (task, round, attempt) in every key and share:

1. **advertise**: each client makes two X25519 key pairs (``c`` encrypts shares, ``s``
   agrees masks) and a 32-byte self-mask seed ``b``, and sends both public keys and a
   commitment to ``b``.
2. **roster**: the aggregator sends the clients that advertised (``U1``), the graph's
   degree ``k`` and the threshold ``t``; every client computes the same ``k``-regular
   graph from the public seed (:mod:`.graph`).
3. **share**: each client Shamir-shares ``b`` and its ``s`` private key among its
   neighbours (any ``t`` of them recover each), encrypts each neighbour's pair of
   shares to that neighbour, and the aggregator relays them (``U2``: who shared).
4. **check**: each client opens its shares and names any neighbour whose share it
   cannot open; the aggregator drops those, and clients that did not answer, from
   the set that masks (``U2'``) and tells the clients.
5. **mask**: each client sends ``x + PRG(b) + sum(+/- PRG(s_ij))`` modulo ``2**m`` over
   its neighbours ``j`` in ``U2'`` (``+`` when its id sorts first); the aggregator adds
   them up as they arrive (``U3``: whose masked vector arrived and fits).
6. **reveal**: the aggregator sends ``U3``; each client still in the round (those that
   answered step 4, survivors or not) returns, per
   neighbour, the share of ``b`` if that neighbour is in ``U3``, else the share of its
   ``s`` key, never both; the aggregator recovers each survivor's ``b`` and each
   dropped neighbour's ``s`` key, removes their masks and is left with ``sum(x)``.

Up to ``k - t`` of a client's neighbours may drop out before step 6 and the sum is
still recovered; with more, the round fails naming them, never with a wrong sum. The
aggregator learns ``sum(x)`` over ``U3`` only, unless it colludes with ``t`` of some
client's neighbours.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lightning_fed.privacy import shamir
from lightning_fed.privacy.buffers import RECYCLED
from lightning_fed.privacy.errors import SecAggError
from lightning_fed.privacy.graph import neighbours
from lightning_fed.privacy.keys import (
    KEY_BYTES,
    MASK_LABEL,
    SHARE_LABEL,
    KeyPair,
    public_of,
    seal,
    unseal,
)
from lightning_fed.privacy.masking import SEED_BYTES, MaskSum
from lightning_fed.privacy.quantize import add_packed

#: Bytes of one relayed share pair once sealed: nonce, two shares, tag.
SEALED_BYTES = 12 + 2 * shamir.SHARE_BYTES + 16


def commitment(context: bytes, seed: bytes) -> bytes:
    """What a client publishes about its self-mask seed: binding, and hiding because
    the seed is 32 random bytes."""
    return hashlib.sha256(b"lightning_fed secagg self mask|" + context + b"|" + seed).digest()


def threshold_for(degree: int, fraction: float) -> int:
    """Shares needed to recover a secret shared among ``degree`` neighbours: more than
    ``fraction`` of them (at least 1)."""
    return max(1, min(degree, math.floor(fraction * degree) + 1))


#: Bytes of an advert's signature (Ed25519, by the client's node key).
SIGNATURE_BYTES = 64


@dataclass(frozen=True)
class Advert:
    """A client's public keys, its commitment to its self-mask seed, and its signature of
    them with its node key (empty where no key signs: in-process tests)."""

    c: bytes
    s: bytes
    commit: bytes
    signature: bytes = b""

    def signed_bytes(self, context: bytes, node: str) -> bytes:
        """What the signature covers: the round, the node and its keys."""
        return b"|".join(
            (b"lightning_fed secagg advert", context, node.encode(), self.c, self.s, self.commit)
        )

    def to_body(self) -> dict[str, str]:
        out = {"c": self.c.hex(), "s": self.s.hex(), "commit": self.commit.hex()}
        if self.signature:
            out["signature"] = self.signature.hex()
        return out

    @classmethod
    def from_body(cls, body: Mapping[str, object]) -> Advert:
        """Raises ValueError naming the field that does not fit."""
        values = []
        for key, size in (("c", KEY_BYTES), ("s", KEY_BYTES), ("commit", KEY_BYTES)) + (
            (("signature", SIGNATURE_BYTES),) if "signature" in body else ()
        ):
            raw = body.get(key)
            try:
                value = bytes.fromhex(raw) if isinstance(raw, str) else b""
            except ValueError:
                value = b""
            if len(value) != size:
                raise ValueError(f"field {key!r} must be {size} bytes as hex, got {raw!r}")
            values.append(value)
        return cls(*values)


@dataclass(frozen=True)
class Roster:
    """Step 2: who advertised, the graph's degree and the threshold."""

    adverts: Mapping[str, Advert]
    degree: int
    threshold: int
    seed: bytes
    #: Elements of every masked vector, so that clients can expand their masks while
    #: they train (0: not said; they expand them when they mask).
    size: int = 0

    @property
    def nodes(self) -> list[str]:
        return sorted(self.adverts)

    def position(self, node: str) -> int:
        """A node's Shamir x: its 1-based place among the roster's sorted ids."""
        return self.nodes.index(node) + 1

    def graph(self) -> dict[str, list[str]]:
        return neighbours(self.nodes, self.degree, self.seed)

    def to_body(self) -> dict[str, object]:
        return {
            "adverts": {n: a.to_body() for n, a in sorted(self.adverts.items())},
            "degree": self.degree,
            "threshold": self.threshold,
            "seed": self.seed.hex(),
            "size": self.size,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, object]) -> Roster:
        """Raises ValueError naming what does not fit."""
        adverts = body.get("adverts")
        degree, threshold, seed = body.get("degree"), body.get("threshold"), body.get("seed")
        size = body.get("size", 0)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"field 'size' must be a whole number of elements, got {size!r}")
        if not isinstance(adverts, dict) or not adverts:
            raise ValueError(f"field 'adverts' must be a non-empty object, got {adverts!r}")
        if not isinstance(degree, int) or not isinstance(threshold, int):
            raise ValueError(f"degree {degree!r} and threshold {threshold!r} must be integers")
        if not isinstance(seed, str):
            raise ValueError(f"field 'seed' must be hex, got {seed!r}")
        parsed = {str(n): Advert.from_body(a) for n, a in adverts.items() if isinstance(a, dict)}
        if len(parsed) != len(adverts):
            raise ValueError("every advert must be an object")
        roster = cls(parsed, degree, threshold, bytes.fromhex(seed), size)
        roster.graph()  # raises ValueError on an impossible degree
        if not 1 <= threshold <= degree:
            raise ValueError(f"threshold {threshold} must be in [1, degree {degree}]")
        return roster


@dataclass
class Reveal:
    """Step 6, one client's answer: shares of survivors' seeds, of dropped ones' keys."""

    b: dict[str, bytes] = field(default_factory=dict)
    s: dict[str, bytes] = field(default_factory=dict)

    def to_body(self) -> dict[str, dict[str, str]]:
        return {
            "b": {n: v.hex() for n, v in sorted(self.b.items())},
            "s": {n: v.hex() for n, v in sorted(self.s.items())},
        }

    @classmethod
    def from_body(cls, body: Mapping[str, object]) -> Reveal:
        """Raises ValueError naming what does not fit."""
        out = cls()
        for key, target in (("b", out.b), ("s", out.s)):
            raw = body.get(key, {})
            if not isinstance(raw, dict):
                raise ValueError(f"field {key!r} must be an object, got {raw!r}")
            for node, value in raw.items():
                try:
                    data = bytes.fromhex(value) if isinstance(value, str) else b""
                except ValueError:
                    data = b""
                if len(data) != shamir.SHARE_BYTES:
                    raise ValueError(
                        f"share {key}[{node!r}] must be {shamir.SHARE_BYTES} bytes as hex"
                    )
                target[str(node)] = data
        return out


def pair_sign(me: str, other: str) -> bool:
    """Whether ``me`` adds (True) or subtracts the mask it shares with ``other``."""
    return me < other


class SecAggClient:
    """A client's side of one secure-aggregation round.

    Args:
        node: the client's node id.
        context: names the round in every key and share.
        sign: signs this client's advert with its node key, so that its neighbours
            know the keys are its own (an aggregator that swapped them would sit in the
            middle of every key agreement and open every share).
        verify: ``verify(node, signature, data)``: whether a neighbour's advert carries
            that node's signature; every advert of the roster must.
    """

    def __init__(
        self,
        node: str,
        context: bytes,
        *,
        sign: Callable[[bytes], bytes] | None = None,
        verify: Callable[[str, bytes, bytes], bool] | None = None,
    ) -> None:
        self.node = node
        self.context = context
        self._c = KeyPair()
        self._s = KeyPair()
        self._b = os.urandom(SEED_BYTES)
        self._verify = verify
        advert = Advert(self._c.public, self._s.public, commitment(context, self._b))
        if sign is not None:
            signature = sign(advert.signed_bytes(context, node))
            advert = Advert(advert.c, advert.s, advert.commit, signature)
        self._advert = advert
        self.roster: Roster | None = None
        self._held: dict[str, tuple[int, int]] = {}  # neighbour -> (b share, s share)
        self.masked_with: list[str] = []
        self._premasked: _Premask | None = None

    def advertise(self) -> Advert:
        """Step 1."""
        return self._advert

    def share(self, roster: Roster, min_threshold: float) -> dict[str, bytes]:
        """Step 3: the sealed share pair for each neighbour.

        Raises:
            SecAggError: this client is not in the roster with its own keys, an advert
                of the roster does not carry its node's signature (with ``verify``), or
                the roster's threshold is below what this client accepts
                (``min_threshold`` of its neighbours).
        """
        if roster.adverts.get(self.node) != self.advertise():
            raise SecAggError(
                f"client {self.node!r} is not in the aggregator's roster with its own keys; "
                "the round cannot be secure"
            )
        if self._verify is not None:
            forged = sorted(
                n
                for n, a in roster.adverts.items()
                if not self._verify(n, a.signature, a.signed_bytes(self.context, n))
            )
            if forged:
                raise SecAggError(
                    f"client {self.node!r}: the roster's keys of {', '.join(forged)} do not "
                    "carry their node's signature: they were changed after they were sent "
                    "(by the aggregator or in the storage), and sharing secrets under them "
                    "could expose this client's update; the round cannot be secure"
                )
        if roster.threshold < threshold_for(roster.degree, min_threshold):
            raise SecAggError(
                f"the aggregator asks for a threshold of {roster.threshold} of "
                f"{roster.degree} neighbours; this client accepts no fewer than "
                f"{threshold_for(roster.degree, min_threshold)}"
            )
        self.roster = roster
        mine = roster.graph()[self.node]
        xs = [roster.position(j) for j in mine]
        b_shares = shamir.split(self._b, xs, roster.threshold)
        s_shares = shamir.split(self._s.private_bytes, xs, roster.threshold)
        out = {}
        for j, x in zip(mine, xs, strict=True):
            key = self._c.agree(roster.adverts[j].c, SHARE_LABEL, self.context)
            plain = shamir.encode_share(b_shares[x]) + shamir.encode_share(s_shares[x])
            out[j] = seal(key, plain, self._aad(self.node, j))
        return out

    def _aad(self, sender: str, recipient: str) -> bytes:
        return self.context + f"|{sender}->{recipient}".encode()

    def receive_shares(self, sealed: Mapping[str, bytes]) -> dict[str, str]:
        """Step 4: open the shares relayed to this client; returns the neighbours whose
        share could not be opened, with why (they will not be masked with)."""
        roster = self._need_roster()
        mine = set(roster.graph()[self.node])
        problems = {}
        for sender, data in sorted(sealed.items()):
            if sender not in mine:
                problems[sender] = "sent a share but is not a neighbour"
                continue
            key = self._c.agree(roster.adverts[sender].c, SHARE_LABEL, self.context)
            plain = unseal(key, data, self._aad(sender, self.node))
            if plain is None or len(plain) != 2 * shamir.SHARE_BYTES:
                problems[sender] = "its share does not open with the agreed key"
                continue
            try:
                b = shamir.decode_share(plain[: shamir.SHARE_BYTES])
                s = shamir.decode_share(plain[shamir.SHARE_BYTES :])
            except ValueError as exc:
                problems[sender] = f"its share is malformed ({exc})"
                continue
            self._held[sender] = (b, s)
        return problems

    def premask(self, modulus_bits: int) -> None:
        """Before step 5, while the client trains: expand the self mask and the pairwise
        mask of every neighbour in the roster into one vector of ``roster.size``
        residues (the masks do not depend on the update), so that :meth:`mask` adds
        them in one pass. Costs one int64 vector of memory until then; does nothing
        when the roster does not say the size."""
        roster = self._need_roster()
        if not roster.size:
            return
        # One thread: the client is training on the others.
        masks = MaskSum(RECYCLED.take(roster.size, torch.int64), modulus_bits)
        masks.add(self._b)
        partners = roster.graph()[self.node]
        for j in partners:
            masks.add(self._pair_seed(j), subtract=not pair_sign(self.node, j))
        self._premasked = _Premask(modulus_bits, frozenset(partners), masks.reduce())

    def _pair_seed(self, j: str) -> bytes:
        return self._s.agree(self._need_roster().adverts[j].s, MASK_LABEL, self.context)

    def mask(self, vector: torch.Tensor, maskers: Sequence[str], modulus_bits: int) -> torch.Tensor:
        """Step 5: ``vector`` masked with the self mask and the pairwise masks of the
        neighbours in ``maskers`` (``U2'``) whose shares this client holds; see
        :meth:`mask_update` (here the vector exists already: masked in place, unless the
        masks were expanded ahead, which it is then added to).

        Raises:
            SecAggError: this client is not among ``maskers``.
        """

        def add(base: torch.Tensor | None) -> torch.Tensor:
            return vector if base is None else base.add_(vector)

        return self.mask_update(add, vector.numel(), maskers, modulus_bits)

    def mask_update(
        self,
        encode: Callable[[torch.Tensor | None], torch.Tensor],
        size: int,
        maskers: Sequence[str],
        modulus_bits: int,
    ) -> torch.Tensor:
        """Step 5: the client's vector of ``size`` residues, masked with the self mask and
        the pairwise masks of the neighbours in ``maskers`` (``U2'``) whose shares this
        client holds. ``encode(base)`` makes the vector: added in place to ``base``, the
        masks :meth:`premask` expanded (no new vector, one pass fewer), or, given
        ``None``, a new vector, masked in place here. Masks of neighbours expanded ahead
        but left out of ``maskers`` are taken back out.

        Raises:
            SecAggError: this client is not among ``maskers``.
        """
        self._need_roster()
        if self.node not in maskers:
            raise SecAggError(f"client {self.node!r} was left out of this round's masking")
        allowed = set(maskers)
        self.masked_with = sorted(j for j in self._held if j in allowed)
        pre, self._premasked = self._premasked, None
        if pre is not None and pre.fits(size, modulus_bits):
            # the premask is reduced; one unreduced addition (the update) on top
            masks = MaskSum(encode(pre.residues), modulus_bits, torch.get_num_threads(), 1)
            for j in sorted(pre.partners - set(self.masked_with)):  # expanded, not wanted
                masks.add(self._pair_seed(j), subtract=pair_sign(self.node, j))
            return masks.reduce()
        masks = MaskSum(encode(None), modulus_bits, threads=torch.get_num_threads())
        masks.add(self._b)
        for j in self.masked_with:
            masks.add(self._pair_seed(j), subtract=not pair_sign(self.node, j))
        return masks.reduce()

    def reveal(self, survivors: Sequence[str]) -> Reveal:
        """Step 6: for each neighbour whose shares this client holds, its self-mask share
        if it survived, else its key share; never both.

        Raises:
            SecAggError: this client is not among ``survivors``, or the list is not a
                subset of the roster.
        """
        roster = self._need_roster()
        alive = set(survivors)
        if not alive <= set(roster.adverts):
            raise SecAggError(
                f"client {self.node!r}: the aggregator's survivor list {sorted(alive)} does "
                "not fit this round (not a subset of the roster)"
            )
        if len(alive) < roster.threshold:
            raise SecAggError(
                f"client {self.node!r}: the aggregator reports {len(alive)} survivor(s), fewer "
                f"than the threshold {roster.threshold}; revealing shares now could expose a "
                "single client's update"
            )
        out = Reveal()
        for j, (b, s) in self._held.items():
            if j in alive:
                out.b[j] = shamir.encode_share(b)
            else:
                out.s[j] = shamir.encode_share(s)
        return out

    def _need_roster(self) -> Roster:
        if self.roster is None:
            raise SecAggError("the roster step has not happened yet")
        return self.roster


@dataclass
class _Premask:
    """Masks a client expanded ahead of step 5: the self mask plus every partner's."""

    modulus_bits: int
    partners: frozenset[str]
    residues: torch.Tensor

    def fits(self, size: int, modulus_bits: int) -> bool:
        return modulus_bits == self.modulus_bits and tuple(self.residues.shape) == (size,)


class SecAggServer:
    """The aggregator's side of one secure-aggregation round: it relays, sums, unmasks.

    Args:
        context: names the round in every key and share.
        clients: the round's chosen clients.
        size: elements of each client's vector.
        modulus_bits: the sums are taken modulo ``2**modulus_bits``.
        degree: the graph's degree wanted (capped at the clients that advertise).
        threshold: the fraction of a client's neighbours whose shares recover its
            secrets (more than this many are needed).
        seed: the public seed of the graph.
    """

    def __init__(
        self,
        context: bytes,
        clients: Sequence[str],
        size: int,
        modulus_bits: int,
        degree: int | None,
        threshold: float,
        seed: bytes,
    ) -> None:
        self.context = context
        self.clients = sorted(clients)
        self.size = size
        self.modulus_bits = modulus_bits
        self.degree = degree
        self.threshold = threshold
        self.seed = seed
        self.adverts: dict[str, Advert] = {}
        self.roster: Roster | None = None
        self.sealed: dict[str, dict[str, bytes]] = {}  # recipient -> sender -> share
        self.shared: set[str] = set()  # U2
        self.complaints: dict[str, str] = {}  # excluded client -> why
        self.maskers: list[str] = []  # U2'
        self.helpers: list[str] = []  # who answered step 4: they hold shares to reveal
        # The masked vectors' sum modulo 2**64, reduced modulo 2**modulus_bits to unmask.
        self.total = RECYCLED.take(size, torch.int64)
        self.unmasked = False  # unmask() removes the masks from total in place, once
        self.masked: set[str] = set()  # U3
        self.masked_with: dict[str, list[str]] = {}
        self.reveals: dict[str, Reveal] = {}
        self.bad_reveals: dict[str, str] = {}

    # -- steps 1-2 -------------------------------------------------------------------
    def add_advert(self, sender: str, advert: Advert) -> None:
        if sender in self.clients:
            self.adverts[sender] = advert

    def make_roster(self, min_clients: int) -> Roster:
        """Step 2, once the adverts are in.

        Raises:
            SecAggError: fewer than ``max(3, min_clients)`` clients advertised.
        """
        from lightning_fed.privacy.graph import default_degree

        n = len(self.adverts)
        need = max(3, min_clients)
        if n < need:
            missing = sorted(set(self.clients) - set(self.adverts))
            raise SecAggError(
                f"{n} client(s) sent their keys, secure aggregation needs at least {need}; "
                f"none from {', '.join(missing)}"
            )
        k = min(n - 1, self.degree if self.degree else default_degree(n))
        if k % 2 and n % 2:
            k = k + 1 if k + 1 <= n - 1 else k - 1
        self.roster = Roster(
            dict(self.adverts), k, threshold_for(k, self.threshold), self.seed, self.size
        )
        return self.roster

    # -- step 3 ----------------------------------------------------------------------
    def add_shares(self, sender: str, sealed: Mapping[str, bytes]) -> str | None:
        """Fold in one client's sealed shares; returns why they were refused, if so."""
        roster = self._need_roster()
        if sender not in roster.adverts:
            return "sent shares but is not in the roster"
        expected = set(roster.graph()[sender])
        if set(sealed) != expected:
            return f"sent shares for {sorted(sealed)}, its neighbours are {sorted(expected)}"
        short = sorted(j for j, data in sealed.items() if len(data) != SEALED_BYTES)
        if short:
            return f"sent shares of the wrong length for {short} (expected {SEALED_BYTES} bytes)"
        for j, data in sealed.items():
            self.sealed.setdefault(j, {})[sender] = bytes(data)
        self.shared.add(sender)
        return None

    def relayed(self, recipient: str) -> dict[str, bytes]:
        """What ``recipient`` receives in step 3: its neighbours' sealed shares."""
        return {s: d for s, d in self.sealed.get(recipient, {}).items() if s in self.shared}

    # -- step 4 ----------------------------------------------------------------------
    def fix_maskers(self, checked: Mapping[str, Mapping[str, str]]) -> list[str]:
        """``U2'``: the clients that shared and answered step 4 (``checked``: each
        answering client's complaints), less every client complained of."""
        for complainer, problems in sorted(checked.items()):
            for culprit, why in sorted(problems.items()):
                self.complaints.setdefault(culprit, f"{complainer} says {why}")
        self.maskers = sorted(c for c in self.shared if c in checked and c not in self.complaints)
        self.helpers = sorted(c for c in self.shared if c in checked)
        return self.maskers

    # -- step 5 ----------------------------------------------------------------------
    def add_masked(self, sender: str, vector: torch.Tensor, masked_with: Sequence[str]) -> None:
        """Fold in one masked vector (int64 residues).

        Raises:
            SecAggError: the sender was not to mask this round, sent twice, or its vector
                or its list of mask partners does not fit (name it and leave it out).
        """
        self._check_masker(sender, masked_with)
        if vector.dtype != torch.int64 or tuple(vector.shape) != (self.size,):
            raise SecAggError(
                f"{sender}'s masked vector has {vector.numel()} elements of {vector.dtype}, "
                f"expected {self.size} residues"
            )
        self._accumulate(vector.detach().contiguous().numpy().view(np.uint64))
        self._masked(sender, masked_with)

    def add_packed(self, sender: str, data: torch.Tensor, masked_with: Sequence[str]) -> None:
        """Fold in one masked vector as it travels (:func:`~.quantize.pack`'s bytes),
        added without unpacking it (:func:`~.quantize.add_packed`).

        Raises:
            SecAggError: as :meth:`add_masked`.
        """
        width = (self.modulus_bits + 7) // 8
        self._check_masker(sender, masked_with)
        if data.dtype != torch.uint8 or tuple(data.shape) != (self.size * width,):
            raise SecAggError(
                f"{sender}'s masked vector is {data.numel()} elements of {data.dtype}, "
                f"expected {self.size} residues of {width} bytes ({self.size * width} uint8)"
            )
        add_packed(self.total, data, self.modulus_bits)
        self._masked(sender, masked_with)

    def _accumulate(self, residues: np.ndarray) -> None:
        """``total += residues`` modulo ``2**64``, as :func:`~.quantize.add_packed` adds."""
        total = self.total.numpy().view(np.uint64)
        np.add(total, residues, out=total)

    def _check_masker(self, sender: str, masked_with: Sequence[str]) -> None:
        roster = self._need_roster()
        if self.unmasked:
            raise SecAggError(f"{sender}'s masked vector came after the sum was unmasked already")
        if sender not in self.maskers:
            raise SecAggError(f"{sender} sent a masked vector but was not among the maskers")
        if sender in self.masked:
            raise SecAggError(f"{sender} sent a second masked vector")
        partners = set(roster.graph()[sender]) & set(self.maskers) - {sender}
        if set(masked_with) != partners:
            raise SecAggError(
                f"{sender} masked with {sorted(masked_with)}, expected {sorted(partners)}"
            )

    def _masked(self, sender: str, masked_with: Sequence[str]) -> None:
        self.masked.add(sender)
        self.masked_with[sender] = sorted(masked_with)

    # -- step 6 ----------------------------------------------------------------------
    @property
    def survivors(self) -> list[str]:
        return sorted(self.masked)

    def add_reveal(self, sender: str, reveal: Reveal) -> str | None:
        """Fold in one survivor's shares; returns why they were refused, if so."""
        roster = self._need_roster()
        if sender not in self.helpers:
            return "sent shares to reveal but holds none of this round's"
        held = set(roster.graph()[sender])
        alive = self.masked
        wrong_b = sorted(set(reveal.b) - (held & alive))
        wrong_s = sorted(set(reveal.s) - (held - alive))
        if wrong_b or wrong_s:
            return (
                f"revealed shares it must not: self-mask shares of {wrong_b}, key shares "
                f"of {wrong_s}"
            )
        self.reveals[sender] = reveal
        return None

    def needed(self) -> dict[str, tuple[str, set[str]]]:
        """For every secret step 6 must recover: ``(kind, neighbours that hold it)``."""
        roster = self._need_roster()
        graph = roster.graph()
        out: dict[str, tuple[str, set[str]]] = {}
        helpers = set(self.helpers)
        for i in self.masked:
            out[i] = ("b", set(graph[i]) & helpers)
        for d in sorted(set(self.maskers) - self.masked):
            if any(d in self.masked_with[j] for j in self.masked):
                out[d] = ("s", set(graph[d]) & helpers)
        return out

    def can_finish(self) -> bool:
        """Whether enough shares arrived to recover every needed secret."""
        roster = self._need_roster()
        for node, (kind, _) in self.needed().items():
            got = sum(1 for r in self.reveals.values() if node in (r.b if kind == "b" else r.s))
            if got < roster.threshold:
                return False
        return True

    def unmask(self) -> torch.Tensor:
        """The sum of the survivors' vectors (``U3``), masks removed.

        Raises:
            SecAggError: a secret could not be recovered (too few or too many wrong
                shares); names the clients and what was missing.
        """
        roster = self._need_roster()
        if self.unmasked:
            raise SecAggError("this round's sum was unmasked already (its masks are gone)")
        # in place (no second vector): reducing leaves the sum's residues as they are
        total = self.total.bitwise_and_((1 << self.modulus_bits) - 1)
        masks = MaskSum(total, self.modulus_bits, threads=torch.get_num_threads())
        failures = []
        for node, (kind, holders) in sorted(self.needed().items()):
            shares = {}
            for holder, r in self.reveals.items():
                data = (r.b if kind == "b" else r.s).get(node)
                if data is not None:
                    shares[roster.position(holder)] = shamir.decode_share(data)
            advert = roster.adverts[node]
            if kind == "b":

                def check(secret: bytes, advert: Advert = advert) -> bool:
                    return commitment(self.context, secret) == advert.commit
            else:

                def check(secret: bytes, advert: Advert = advert) -> bool:
                    return len(secret) == KEY_BYTES and public_of(secret) == advert.s

            try:
                secret, bad = shamir.recover(shares, roster.threshold, check)
            except ValueError as exc:
                answered = sorted(h for h in holders if h in self.reveals)
                failures.append(
                    f"{node}'s {'self-mask seed' if kind == 'b' else 'mask key'} ({exc}; "
                    f"{len(answered)} of its neighbours answered: {', '.join(answered) or 'none'})"
                )
                continue
            for x in bad:
                culprit = roster.nodes[x - 1]
                self.bad_reveals[culprit] = f"sent a wrong share of {node}'s secret"
            if kind == "b":
                masks.add(secret, subtract=True)
                continue
            dropped_key = KeyPair(secret)
            for j in self.masked:
                if node in self.masked_with[j]:
                    seed = dropped_key.agree(roster.adverts[j].s, MASK_LABEL, self.context)
                    # j added its share of the pair's mask with j's sign: take it back.
                    masks.add(seed, subtract=pair_sign(j, node))
        if failures:
            raise SecAggError(
                "secure aggregation cannot recover the sum: too few correct shares of "
                + "; ".join(failures)
                + f" ({roster.threshold} needed of {roster.degree} neighbours); hint: fewer "
                "clients may drop out between masking and revealing than the degree minus "
                "the threshold"
            )
        self.unmasked = True
        return masks.reduce()

    def release(self) -> None:
        """Hand the sum's buffer back for the next round (after :meth:`unmask`, once its
        result is no longer read); the server adds nothing more."""
        total, self.total = self.total, torch.zeros(0, dtype=torch.int64)
        RECYCLED.give(total)

    def _need_roster(self) -> Roster:
        if self.roster is None:
            raise SecAggError("the roster step has not happened yet")
        return self.roster
