"""The safetensors codec: compatible with the reference library both ways, zero-copy on
receive, and every malformed blob reported as a ValueError with the reason."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lightning_fed.channel.tensors import (
    StreamingHash,
    allocate_buffer,
    decode_tensors,
    encode_tensors,
    sha256_hex,
)

SAMPLE = {
    "w": torch.randn(7, 5),
    "b16": torch.randn(3).to(torch.bfloat16),
    "h": torch.randn(2, 2).half(),
    "d": torch.randn(3).double(),
    "i8": torch.tensor([-1, 2], dtype=torch.int8),
    "u8": torch.tensor([250, 3], dtype=torch.uint8),
    "flag": torch.tensor([True, False, True]),
    "scalar": torch.tensor(3.5),
    "empty": torch.zeros(0, 4),
    "long": torch.arange(5),
}


def _buffer(data: bytes) -> bytearray:
    return bytearray(data)


def test_our_blobs_load_with_the_reference_library() -> None:
    blob = encode_tensors(SAMPLE).to_bytes()
    ref = st_load(blob)
    assert ref.keys() == SAMPLE.keys()
    for k, v in SAMPLE.items():
        assert ref[k].dtype == v.dtype and torch.equal(ref[k], v)


def test_reference_blobs_decode_here() -> None:
    got = decode_tensors(_buffer(st_save(SAMPLE)))
    for k, v in SAMPLE.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v)


def test_decoded_tensors_are_writable_views_of_the_buffer() -> None:
    blob = encode_tensors({"w": torch.ones(1000)})
    buf = allocate_buffer(blob.size)
    buf[:] = blob.to_bytes()
    t = decode_tensors(buf)["w"]
    t += 1  # writable, and it really is the buffer's memory
    assert decode_tensors(buf)["w"][0].item() == 2.0


def test_encoding_is_zero_copy_and_sizes_add_up() -> None:
    big = torch.randn(1 << 18)
    blob = encode_tensors({"big": big})
    assert blob.size == sum(len(c) for c in blob.chunks)
    assert np.shares_memory(np.asarray(blob.chunks[1]), big.numpy())  # views, not copies
    assert blob.to_bytes()[-4:] == big[-1:].numpy().tobytes()


def test_shared_and_non_contiguous_tensors_are_sent_as_values() -> None:
    base = torch.randn(4, 6)
    tensors = {"a": base, "tied": base, "t": base.t(), "slice": base[:, 1]}
    got = st_load(encode_tensors(tensors).to_bytes())
    for k, v in tensors.items():
        assert torch.equal(got[k], v)


def test_streaming_hash_equals_hashlib() -> None:
    blob = encode_tensors(SAMPLE)
    h = StreamingHash()
    for c in blob.chunks:
        h.feed(c)
    assert h.hexdigest() == sha256_hex(blob.to_bytes())


def _blob_with_header(header: object, data: bytes = b"") -> bytearray:
    text = json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    ("buffer", "reason"),
    [
        (bytearray(b"\x01\x02"), "too short"),
        (bytearray(struct.pack("<Q", 1 << 40) + b"{}"), "header length"),
        (bytearray(struct.pack("<Q", 2) + b"\xff\xfe"), "not JSON"),
        (_blob_with_header([1, 2]), "not an object"),
        (
            _blob_with_header(
                {"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
            ),
            "unknown dtype",
        ),
        (
            _blob_with_header(
                {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4
            ),
            "malformed shape",
        ),
        (
            _blob_with_header(
                {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4
            ),
            "outside the blob",
        ),
        (
            _blob_with_header(
                {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4
            ),
            "declares shape",
        ),
        (
            _blob_with_header(
                {
                    "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "y": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                b"\0" * 8,
            ),
            "overlaps or leaves gaps",
        ),
        (
            _blob_with_header(
                {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9
            ),
            "trailing",
        ),
        (
            _blob_with_header(
                {"x": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x07"
            ),
            "bool",
        ),
        (
            _blob_with_header(
                {"x\n": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\x01"
            ),
            "tensor name",
        ),
    ],
)
def test_malformed_blobs_raise_value_error_with_reason(buffer: bytearray, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_tensors(buffer)


def test_unsupported_tensors_are_refused_before_sending() -> None:
    with pytest.raises(TypeError, match="only dense"):
        encode_tensors({"s": torch.eye(3).to_sparse()})
    with pytest.raises(TypeError, match="only dense"):
        encode_tensors({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="reserved"):
        encode_tensors({"__metadata__": torch.zeros(1)})


def test_unaligned_data_from_a_foreign_writer_is_copied_not_misread() -> None:
    data = b"\x07" + struct.pack("<f", 1.5)
    buf = _blob_with_header(
        {
            "u": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
            "f": {"dtype": "F32", "shape": [1], "data_offsets": [1, 5]},
        },
        data,
    )
    got = decode_tensors(buf)
    assert got["u"].item() == 7 and got["f"].item() == 1.5


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 2**70]},
    ],
)
def test_hostile_header_values_are_value_errors(entry: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        decode_tensors(_blob_with_header({"x": entry}, b"\0" * 4))


def test_deeply_nested_header_is_a_value_error() -> None:
    text = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ValueError, match="not JSON"):
        decode_tensors(bytearray(struct.pack("<Q", len(text)) + text))
