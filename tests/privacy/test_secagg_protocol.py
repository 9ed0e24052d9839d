"""SecAgg+'s two sides driven in one process: the unmasked sum equals the plain sum over
the survivors, dropouts within the threshold are recovered, beyond it the round fails
naming the clients, and malformed shares or vectors are named and left out."""

from __future__ import annotations

import os
from collections.abc import Collection

import pytest
import torch

from lightning_fed.privacy import shamir
from lightning_fed.privacy.errors import SecAggError
from lightning_fed.privacy.graph import default_degree, neighbours
from lightning_fed.privacy.masking import add_mask, mask
from lightning_fed.privacy.quantize import pack
from lightning_fed.privacy.secagg import (
    SEALED_BYTES,
    Advert,
    Reveal,
    Roster,
    SecAggClient,
    SecAggServer,
)

BITS = 40
CONTEXT = b"task|3|attempt"


def run(
    vectors: dict[str, torch.Tensor],
    *,
    degree: int | None = None,
    threshold: float = 0.5,
    silent_at_share: Collection[str] = (),
    silent_at_mask: Collection[str] = (),
    silent_at_reveal: Collection[str] = (),
    bad_share_from: str | None = None,
    wrong_reveal_from: str | None = None,
    premask: bool = True,
    packed: Collection[str] | None = None,
    update_into_masks: bool = False,
) -> tuple[torch.Tensor, SecAggServer]:
    """One round; a client 'silent' at a step sends nothing from that step on. With
    ``premask`` clients expand their masks right after sharing, as in a federation
    (before they know who will mask), else when they mask. The clients in ``packed``
    (default: all) have their vectors added as they travel, the others unpacked. With
    ``update_into_masks`` clients add their vectors to the masks expanded ahead
    (:meth:`SecAggClient.mask_update`, as in a federation) instead of masking a copy."""
    names = sorted(vectors)
    packed = names if packed is None else packed
    size = next(iter(vectors.values())).numel()
    server = SecAggServer(CONTEXT, names, size, BITS, degree, threshold, os.urandom(32))
    clients = {n: SecAggClient(n, CONTEXT) for n in names}
    for n, c in clients.items():
        server.add_advert(n, Advert.from_body(c.advertise().to_body()))
    roster = Roster.from_body(server.make_roster(min_clients=3).to_body())
    for n, c in clients.items():
        if n in silent_at_share:
            continue
        sealed = c.share(roster, threshold)
        if n == bad_share_from:
            victim = sorted(sealed)[0]
            sealed[victim] = os.urandom(SEALED_BYTES)  # right length, wrong key
        assert server.add_shares(n, sealed) is None
        if premask:
            c.premask(BITS)
    checked = {}
    for n, c in clients.items():
        if n not in silent_at_share:
            checked[n] = c.receive_shares(server.relayed(n))
    maskers = server.fix_maskers(checked)
    for n in maskers:
        if n in silent_at_mask:
            continue
        c = clients[n]
        if update_into_masks:  # as a federation's client: written into its masks

            def encode(base: torch.Tensor | None, v: torch.Tensor = vectors[n]) -> torch.Tensor:
                return v.clone() if base is None else base.add_(v)

            masked = c.mask_update(encode, size, maskers, BITS)
        else:
            masked = c.mask(vectors[n].clone(), maskers, BITS)
        if packed and n in packed:
            server.add_packed(n, pack(masked, BITS), c.masked_with)  # as the aggregator
        else:
            server.add_masked(n, masked, c.masked_with)
    for n in server.helpers:
        if n in silent_at_reveal:
            continue
        reveal = clients[n].reveal(server.survivors)
        if n == wrong_reveal_from:
            for k in reveal.b:
                reveal.b[k] = shamir.encode_share(shamir.decode_share(reveal.b[k]) ^ 1)
        assert server.add_reveal(n, Reveal.from_body(reveal.to_body())) is None
    return server.unmask(), server


def vectors_for(n: int, size: int = 1000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {f"c{i}": torch.randint(0, 2**20, (size,), generator=g) for i in range(n)}


def plain_sum(vectors: dict[str, torch.Tensor], who: Collection[str]) -> torch.Tensor:
    return sum((vectors[n] for n in who), torch.zeros_like(next(iter(vectors.values()))))


@pytest.mark.parametrize("premask", [True, False])
@pytest.mark.parametrize("n", [3, 5, 8, 20])
def test_the_unmasked_sum_is_the_plain_sum(n: int, premask: bool) -> None:
    vectors = vectors_for(n)
    total, server = run(vectors, premask=premask)
    assert torch.equal(total, plain_sum(vectors, vectors))
    assert server.roster is not None and server.roster.degree == min(n - 1, default_degree(n))


@pytest.mark.parametrize("premask", [True, False])
def test_an_update_written_into_the_masks_sums_alike(premask: bool) -> None:
    """``mask_update`` adds the update to the masks expanded ahead (or, without them,
    masks a new vector); a client silent before masking has its neighbours take its
    mask back out, one silent after is recovered from its shares, and the sum is the
    survivors' plain sum. A second unmask is refused (the masks were removed in
    place)."""
    vectors = vectors_for(6)
    total, server = run(
        vectors,
        premask=premask,
        update_into_masks=True,
        silent_at_share={"c2"},
        silent_at_mask={"c4"},
    )
    assert torch.equal(total, plain_sum(vectors, set(vectors) - {"c2", "c4"}))
    with pytest.raises(SecAggError, match="unmasked already"):
        server.unmask()
    server.release()  # its buffer serves the next round; nothing more is added
    with pytest.raises(SecAggError, match="after the sum was unmasked already"):
        server.add_packed("c0", pack(vectors["c0"], BITS), [])


def test_a_masked_vector_alone_looks_uniform_and_reveals_nothing() -> None:
    vectors = {n: torch.zeros(4000, dtype=torch.int64) for n in ("a", "b", "c", "d")}
    names = sorted(vectors)
    server = SecAggServer(CONTEXT, names, 4000, BITS, None, 0.5, b"s" * 32)
    clients = {n: SecAggClient(n, CONTEXT) for n in names}
    for n, c in clients.items():
        server.add_advert(n, c.advertise())
    roster = server.make_roster(3)
    for n, c in clients.items():
        server.add_shares(n, c.share(roster, 0.5))
    maskers = server.fix_maskers(
        {n: c.receive_shares(server.relayed(n)) for n, c in clients.items()}
    )
    masked = clients["a"].mask(vectors["a"].clone(), maskers, BITS)
    # An all-zero update comes out spread over the whole modulus.
    assert masked.min() >= 0 and masked.max() < 2**BITS
    assert abs(masked.double().mean().item() / 2**BITS - 0.5) < 0.02
    assert int((masked == 0).sum()) == 0


def test_packed_and_unpacked_vectors_sum_alike() -> None:
    """The aggregator adds vectors as they travel (modulo 2**64, reduced before the
    unmasking); vectors added unpacked in between, and none packed, give the same sum."""
    vectors = vectors_for(6)
    for packed in (["c0", "c2", "c5"], ["c3"], []):
        total, _ = run(vectors, packed=packed)
        assert torch.equal(total, plain_sum(vectors, vectors))


def test_a_client_dropping_after_masking_is_still_summed() -> None:
    vectors = vectors_for(5)
    total, server = run(vectors, silent_at_reveal={"c2"})
    assert server.survivors == sorted(vectors)
    assert torch.equal(total, plain_sum(vectors, vectors))


def test_a_client_dropping_before_masking_is_left_out_of_the_sum() -> None:
    vectors = vectors_for(5)
    total, server = run(vectors, silent_at_mask={"c3"})
    assert "c3" not in server.survivors
    assert torch.equal(total, plain_sum(vectors, server.survivors))


def test_both_dropouts_in_one_round() -> None:
    vectors = vectors_for(6)
    total, server = run(vectors, silent_at_mask={"c1"}, silent_at_reveal={"c4"})
    assert server.survivors == ["c0", "c2", "c3", "c4", "c5"]
    assert torch.equal(total, plain_sum(vectors, server.survivors))


@pytest.mark.parametrize("premask", [True, False])
def test_a_client_silent_before_sharing_never_masks(premask: bool) -> None:
    """Its neighbours expanded their masks with it ahead of time (premask) and must
    take them out again when they learn it is not among the maskers."""
    vectors = vectors_for(5)
    total, server = run(vectors, silent_at_share={"c0"}, premask=premask)
    assert server.maskers == ["c1", "c2", "c3", "c4"]
    assert torch.equal(total, plain_sum(vectors, server.maskers))


def test_too_many_dropouts_fail_the_round_naming_them() -> None:
    vectors = vectors_for(5)  # degree 4, threshold 3: one neighbour more may go
    with pytest.raises(SecAggError, match=r"c0's self-mask seed .*2 of its neighbours answered"):
        run(vectors, silent_at_reveal={"c1", "c2"})


def test_a_malformed_share_is_named_and_its_sender_left_out() -> None:
    vectors = vectors_for(6)
    total, server = run(vectors, bad_share_from="c2")
    assert "c2" in server.complaints
    assert "does not open" in server.complaints["c2"]
    assert "c2" not in server.maskers
    assert torch.equal(total, plain_sum(vectors, server.survivors))


def test_a_wrong_revealed_share_is_named_and_the_sum_still_right() -> None:
    vectors = vectors_for(8)
    total, server = run(vectors, wrong_reveal_from="c5")
    assert set(server.bad_reveals) == {"c5"}
    assert torch.equal(total, plain_sum(vectors, vectors))


def test_wrong_length_shares_and_vectors_are_refused_naming_the_sender() -> None:
    names = ["a", "b", "c"]
    server = SecAggServer(CONTEXT, names, 10, BITS, None, 0.5, b"s" * 32)
    clients = {n: SecAggClient(n, CONTEXT) for n in names}
    for n, c in clients.items():
        server.add_advert(n, c.advertise())
    roster = server.make_roster(3)
    sealed = clients["a"].share(roster, 0.5)
    assert "wrong length" in str(server.add_shares("a", {k: v[:-1] for k, v in sealed.items()}))
    assert "neighbours are" in str(server.add_shares("a", {"b": sealed["b"]}))
    for n, c in clients.items():
        assert server.add_shares(n, c.share(roster, 0.5)) is None
    maskers = server.fix_maskers(
        {n: c.receive_shares(server.relayed(n)) for n, c in clients.items()}
    )
    masked = clients["a"].mask(torch.zeros(10, dtype=torch.int64), maskers, BITS)
    with pytest.raises(SecAggError, match="a's masked vector has 9 elements"):
        server.add_masked("a", masked[:9], clients["a"].masked_with)
    with pytest.raises(SecAggError, match="masked with"):
        server.add_masked("a", masked, [])


def test_a_client_refuses_to_reveal_to_too_few_survivors_or_a_low_threshold() -> None:
    names = ["a", "b", "c", "d", "e"]
    server = SecAggServer(CONTEXT, names, 10, BITS, None, 0.5, b"s" * 32)
    clients = {n: SecAggClient(n, CONTEXT) for n in names}
    for n, c in clients.items():
        server.add_advert(n, c.advertise())
    roster = server.make_roster(3)
    lowered = Roster(roster.adverts, roster.degree, 1, roster.seed)
    with pytest.raises(SecAggError, match="threshold of 1 of 4"):
        clients["a"].share(lowered, 0.5)
    for n, c in clients.items():
        server.add_shares(n, c.share(roster, 0.5))
    maskers = server.fix_maskers(
        {n: c.receive_shares(server.relayed(n)) for n, c in clients.items()}
    )
    clients["a"].mask(torch.zeros(10, dtype=torch.int64), maskers, BITS)
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        clients["a"].reveal(["a"])


def test_fewer_than_three_clients_are_refused() -> None:
    server = SecAggServer(CONTEXT, ["a", "b"], 10, BITS, None, 0.5, b"s" * 32)
    for n in ("a", "b"):
        server.add_advert(n, SecAggClient(n, CONTEXT).advertise())
    with pytest.raises(SecAggError, match="needs at least 3"):
        server.make_roster(2)


# -- the building blocks -------------------------------------------------------------------
def test_shamir_any_threshold_of_the_shares_recover_the_secret_and_fewer_do_not() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    for subset in ([1, 2, 3], [2, 4, 5], [1, 3, 5]):
        assert shamir.combine({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(ValueError, match="2 share"):
        shamir.combine({1: shares[1], 2: shares[2]}, 3)
    assert shamir.combine(shamir.split(b"\0\0ab", [1, 2], 2), 2) == b"\0\0ab"


def test_masks_cancel_and_wrap_modulo_the_modulus() -> None:
    seed = os.urandom(32)
    m = mask(seed, 3 * (1 << 20) + 5, BITS)  # crosses the chunk boundary
    assert int(m.min()) >= 0 and int(m.max()) < 2**BITS
    v = torch.full((m.numel(),), 2**BITS - 1, dtype=torch.int64)
    add_mask(v, seed, BITS)
    add_mask(v, seed, BITS, subtract=True)
    assert bool((v == 2**BITS - 1).all())
    assert not torch.equal(mask(os.urandom(32), 100, BITS), m[:100])


def test_the_graph_is_regular_symmetric_and_the_same_for_everyone() -> None:
    clients = [f"c{i}" for i in range(30)]
    k = default_degree(30)
    g = neighbours(clients, k, b"seed")
    assert k % 2 == 0 and k < 29
    assert all(len(v) == k and c not in v for c, v in g.items())
    assert all(c in g[j] for c, v in g.items() for j in v)
    assert neighbours(list(reversed(clients)), k, b"seed") == g
    assert neighbours(clients, k, b"other") != g


def test_an_aggregator_in_the_middle_is_caught_by_the_advert_signatures() -> None:
    """The aggregator relays the adverts, so it could hand everyone its own key in place
    of c1's: then every share sealed to c1 opens with its key (shown below without the
    check). Signed adverts, checked against each node's key from the task, stop it:
    every client refuses the roster, naming c1; an unsigned advert is refused too."""
    from lightning_fed.channel import NodeIdentity, TaskConfig
    from lightning_fed.privacy.keys import SHARE_LABEL, KeyPair, unseal

    names = ["c1", "c2", "c3", "c4"]
    ids = {n: NodeIdentity.generate(n) for n in names}
    task = TaskConfig("t", {n: i.public_key_text for n, i in ids.items()})

    def clients(check: bool) -> dict[str, SecAggClient]:
        return {
            n: SecAggClient(n, CONTEXT, sign=ids[n].sign, verify=task.verify if check else None)
            for n in names
        }

    def swapped(cs: dict[str, SecAggClient], mitm: KeyPair) -> Roster:
        server = SecAggServer(CONTEXT, names, 10, BITS, None, 0.5, os.urandom(32))
        for n, c in cs.items():
            server.add_advert(n, Advert.from_body(c.advertise().to_body()))
        body = server.make_roster(min_clients=3).to_body()
        body["adverts"]["c1"] = {**body["adverts"]["c1"], "c": mitm.public.hex()}
        return Roster.from_body(body)

    mitm = KeyPair()
    unchecked = clients(check=False)
    roster = swapped(unchecked, mitm)
    sealed = unchecked["c2"].share(roster, 0.5)["c1"]  # c2 seals c1's share to the mitm
    key = mitm.agree(roster.adverts["c2"].c, SHARE_LABEL, CONTEXT)
    assert unseal(key, sealed, CONTEXT + b"|c2->c1") is not None  # and it opens
    checked = clients(check=True)
    roster = swapped(checked, mitm)
    for n in names[1:]:
        with pytest.raises(SecAggError, match="the roster's keys of c1 do not carry"):
            checked[n].share(roster, 0.5)
    unsigned = clients(check=True)
    server = SecAggServer(CONTEXT, names, 10, BITS, None, 0.5, os.urandom(32))
    for n, c in unsigned.items():
        body = c.advertise().to_body()
        if n == "c3":
            del body["signature"]
        server.add_advert(n, Advert.from_body(body))
    roster = Roster.from_body(server.make_roster(min_clients=3).to_body())
    with pytest.raises(SecAggError, match="the roster's keys of c3 do not carry"):
        unsigned["c1"].share(roster, 0.5)
