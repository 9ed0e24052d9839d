"""Fixed-point encoding: the dequantised secure sum is the plain weighted mean within the
documented bound, and the modulus makes overflow impossible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_fed.algorithms.aggregate import TensorSpec, weighted_average
from lightning_fed.privacy.quantize import (
    MAX_MODULUS_BITS,
    PACK_CHUNK,
    Quantizer,
    add_packed,
    modulus_bits,
    pack,
    unpack,
)
from lightning_fed.privacy.vector import Layout


def test_the_weighted_mean_survives_quantisation_within_half_a_step() -> None:
    g = torch.Generator().manual_seed(0)
    q = Quantizer(clip=0.5, bits=16)
    layout = Layout.of(
        {"w": TensorSpec((30, 7), torch.float32), "b": TensorSpec((7,), torch.float32)}
    )
    clients = [
        ({"w": torch.rand(30, 7, generator=g) - 0.5, "b": torch.rand(7, generator=g) - 0.5}, n)
        for n in (10, 300, 7, 55)
    ]
    total = torch.stack([layout.encode(d, {}, n, q) for d, n in clients]).sum(0)
    mean, extras, weight = layout.mean(total, len(clients), q)
    plain = weighted_average(clients)
    assert weight == 372 and extras == {}
    for name in plain:
        err = (mean[name].double() - plain[name].double()).abs().max().item()
        assert err <= q.error_bound * (1 + 1e-9)
        assert mean[name].dtype == torch.float32
    assert q.error_bound == pytest.approx(0.5 / (2**16 - 1))


def test_clipping_bounds_every_coordinate() -> None:
    q = Quantizer(clip=1.0, bits=8)
    levels = q.quantize(torch.tensor([-5.0, -1.0, 0.0, 1.0, 7.0]))
    assert levels.tolist() == [0, 0, 128, 255, 255]
    assert q.dequantize_mean(levels, 1).tolist()[0] == -1.0


def test_extras_are_averaged_per_client_and_the_model_per_sample() -> None:
    q = Quantizer(clip=2.0, bits=20)
    layout = Layout.of(
        {"w": TensorSpec((3,), torch.float32)}, {"dc/w": TensorSpec((3,), torch.float32)}
    )
    a = layout.encode({"w": torch.full((3,), 1.0)}, {"dc/w": torch.full((3,), 1.0)}, 3, q)
    b = layout.encode({"w": torch.full((3,), -1.0)}, {"dc/w": torch.full((3,), 0.0)}, 1, q)
    mean, extras, weight = layout.mean(a + b, 2, q)
    assert weight == 4
    assert torch.allclose(mean["w"], torch.full((3,), 0.5), atol=q.error_bound)
    assert torch.allclose(extras["dc/w"], torch.full((3,), 0.5), atol=q.error_bound)


def test_the_modulus_holds_the_largest_possible_sum() -> None:
    bits, clients, max_samples = 16, 10, 2**20
    m = modulus_bits(bits, clients * max_samples)
    largest = clients * max_samples * (2**bits - 1)
    assert largest < 2**m <= 2 * largest * 2  # enough, and not wastefully more
    with pytest.raises(ValueError, match="need a 63-bit modulus; at most 62"):
        modulus_bits(31, 2**31)
    assert MAX_MODULUS_BITS == 62


def test_packing_keeps_only_the_modulus_bytes() -> None:
    x = torch.randint(0, 2**40, (1001,))
    packed = pack(x, 40)
    assert packed.dtype == torch.uint8 and packed.numel() == 5 * 1001
    assert torch.equal(unpack(packed, 40), x)
    with pytest.raises(ValueError, match="multiple of 5 bytes"):
        unpack(packed[:-1], 40)


@pytest.mark.parametrize("bits", [3, 8, 9, 17, 24, 25, 33, 39, 41, 49, 57, 62])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 9, 1001, PACK_CHUNK + 3])
def test_packing_is_each_residue_s_low_bytes_in_order(bits: int, n: int) -> None:
    """Every width, including the last elements (whose 8-byte window would run past
    the buffer), vectors shorter than one window and longer than a chunk: the bytes
    are each residue's little-endian low bytes, element after element, packed into a
    new buffer or in place, and unpack inverts it."""
    g = torch.Generator().manual_seed(bits * 1000 + n)
    x = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64)
    width = (bits + 7) // 8
    expected = x.numpy().astype("<i8").view(np.uint8).reshape(-1, 8)[:, :width].tobytes()
    if n < 2000:  # the reference the numpy one stands for
        assert expected == bytes(b for v in x.tolist() for b in v.to_bytes(8, "little")[:width])
    packed = pack(x, bits)
    assert packed.numpy().tobytes() == expected
    inside = x.clone()
    in_place = pack(inside, bits, in_place=True)
    assert in_place.numpy().tobytes() == expected
    assert in_place.data_ptr() == inside.data_ptr()  # no second buffer
    with pytest.raises(ValueError, match="in place needs a contiguous 1-D int64"):
        pack(x.to(torch.int32), bits, in_place=True)
    assert torch.equal(unpack(packed, bits), x)
    # Bits a sender set above the modulus (in its top byte) are dropped, not carried
    # into the next element.
    if n and bits % 8:
        junk = packed.clone().view(-1, width)
        junk[:, -1] |= 0xFF << (bits % 8) & 0xFF
        assert torch.equal(unpack(junk.view(-1), bits), x)


@pytest.mark.parametrize("bits", [3, 9, 24, 39, 41, 62])
def test_packed_vectors_add_up_without_unpacking(bits: int) -> None:
    """Adding each packed vector's 8-byte windows whole (the neighbours' bytes and junk
    above the modulus included) and reducing once gives the sum of the residues."""
    g = torch.Generator().manual_seed(bits)
    n, width = 1001, (bits + 7) // 8
    xs = [torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64) for _ in range(7)]
    total = torch.zeros(n, dtype=torch.int64)
    for x in xs:
        packed = pack(x, bits).view(-1, width)
        if bits % 8:
            packed[:, -1] |= 0xFF << (bits % 8) & 0xFF  # a sender's junk above the modulus
        add_packed(total, packed.view(-1), bits)
    expected = torch.zeros(n, dtype=torch.int64)
    for x in xs:  # reduced after every addition: no int64 overflow at 62 bits
        expected = (expected + x) & (2**bits - 1)
    assert torch.equal(total & (2**bits - 1), expected)
    with pytest.raises(ValueError, match="cannot be added"):
        add_packed(torch.zeros(n - 1, dtype=torch.int64), pack(xs[0], bits), bits)


def test_a_tensor_larger_than_a_chunk_round_trips() -> None:
    """Layout quantises and dequantises in chunks: tensors that span several chunks
    and end mid-chunk, next to small ones, land where they belong."""
    from lightning_fed.privacy.vector import CHUNK

    q = Quantizer(clip=1.0, bits=16)
    g = torch.Generator().manual_seed(5)
    values = {"a": torch.rand(2 * CHUNK + 5, generator=g) - 0.5, "b": torch.rand(7, generator=g)}
    layout = Layout.of({n: TensorSpec.of(t) for n, t in values.items()})
    vector = layout.encode(values, {}, 3, q)
    assert torch.equal(vector[: 2 * CHUNK + 5], 3 * q.quantize(values["a"]))
    assert torch.equal(vector[2 * CHUNK + 5 : -1], 3 * q.quantize(values["b"]))
    mean, _, weight = layout.mean(vector, 1, q)
    assert weight == 3
    for name, t in values.items():
        assert (mean[name] - t).abs().max().item() <= q.error_bound + 1e-7  # + float32


def test_encoding_into_a_vector_adds_to_it() -> None:
    """``encode(add_to=base)`` (how a client writes its update into the masks it
    expanded ahead) is ``base + encode()``, across chunks, extras and the weight; a
    base that does not fit is refused."""
    from lightning_fed.privacy.vector import CHUNK

    q = Quantizer(clip=1.0, bits=16)
    g = torch.Generator().manual_seed(6)
    model = {"a": torch.rand(CHUNK + 9, generator=g) - 0.5, "b": torch.rand(3, 2, generator=g)}
    extras = {"x": torch.rand(4, generator=g) - 0.5}
    layout = Layout.of(
        {n: TensorSpec.of(t) for n, t in model.items()}, {"x": TensorSpec.of(extras["x"])}
    )
    base = torch.randint(0, 2**40, (layout.size,), generator=g)
    expected = base + layout.encode(model, extras, 7, q)
    out = layout.encode(model, extras, 7, q, add_to=base)
    assert out is base and torch.equal(out, expected)
    for wrong in (torch.zeros(layout.size - 1, dtype=torch.int64), base.to(torch.int32)):
        with pytest.raises(ValueError, match="cannot add"):
            layout.encode(model, extras, 7, q, add_to=wrong)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="clip"):
        Quantizer(clip=0.0, bits=8)
    with pytest.raises(ValueError, match="bits"):
        Quantizer(clip=1.0, bits=40)
    layout = Layout.of({"w": TensorSpec((3,), torch.float32)})
    with pytest.raises(ValueError, match="positive integer"):
        layout.encode({"w": torch.zeros(3)}, {}, 0, Quantizer(1.0, 8))
    with pytest.raises(ValueError, match=r"w: shape \(4,\)"):
        layout.encode({"w": torch.zeros(4)}, {}, 1, Quantizer(1.0, 8))


def test_unpack_into_a_reused_vector_equals_a_fresh_one() -> None:
    bits = 38
    g = torch.Generator().manual_seed(3)
    first = torch.randint(0, 2**bits, (1000,), generator=g, dtype=torch.int64)
    second = torch.randint(0, 2**bits, (1000,), generator=g, dtype=torch.int64)
    scratch = unpack(pack(first, bits), bits)
    assert torch.equal(scratch, first)
    again = unpack(pack(second, bits), bits, scratch)
    assert again is scratch and torch.equal(again, second)
    # A vector of another size is not unpacked into it (a new one is made).
    short = unpack(pack(second[:10], bits), bits, scratch)
    assert short is not scratch and torch.equal(short, second[:10])


@pytest.mark.parametrize("bits", [20, 38, 61, 62])
def test_a_mask_sum_reduced_late_equals_one_reduced_every_time(bits: int) -> None:
    """MaskSum defers the modular reduction as long as int64 allows; the residues are
    the same as reducing after every mask, and a mask added then subtracted cancels."""
    import os

    from lightning_fed.privacy.masking import MaskSum, add_mask

    g = torch.Generator().manual_seed(bits)
    start = torch.randint(0, 2**bits, (5000,), generator=g, dtype=torch.int64)
    seeds = [os.urandom(32) for _ in range(9)]
    eager = start.clone()
    for i, seed in enumerate(seeds):
        add_mask(eager, seed, bits, subtract=i % 3 == 0)
    late = MaskSum(start.clone(), bits)
    for i, seed in enumerate(seeds):
        late.add(seed, subtract=i % 3 == 0)
    assert torch.equal(late.reduce(), eager)
    for i, seed in enumerate(seeds):
        late.add(seed, subtract=i % 3 != 0)
    assert torch.equal(late.reduce(), start)


def test_a_mask_is_the_seed_s_keystream_whichever_chunk_or_thread_expands_it() -> None:
    """Masks are expanded chunk by chunk, each from its own counter block, possibly on
    several threads: the result is still one AES-CTR keystream from counter zero, read
    as little-endian words, and a sum of many masks on threads (with reductions forced
    inside a chunk by a 61-bit modulus) equals adding them one by one."""
    import os

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from lightning_fed.privacy.masking import CHUNK, MaskSum, add_mask, mask

    bits, size = 39, 2 * CHUNK + 3
    seed = os.urandom(32)
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    words = torch.frombuffer(bytearray(stream.update(bytes(8 * size))), dtype=torch.int64)
    assert torch.equal(mask(seed, size, bits), words & (2**bits - 1))

    bits = 61
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, 2**bits, (size,), generator=g, dtype=torch.int64)
    seeds = [os.urandom(32) for _ in range(5)]
    one_by_one = start.clone()
    for i, s in enumerate(seeds):
        add_mask(one_by_one, s, bits, subtract=i % 2 == 0)
    threaded = MaskSum(start.clone(), bits, threads=3)
    threaded.add_vector(start)  # one pending unreduced addition before the masks
    for i, s in enumerate(seeds):
        threaded.add(s, subtract=i % 2 == 0)
    assert torch.equal(threaded.reduce(), (one_by_one + start) & (2**bits - 1))
