"""The Array codec (`encode_array`, `decode_array`) against Flower's and numpy's own, and the flat
vector helpers (`flatten`, `split_flat`, `unflatten`)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from task.params import decode_array, encode_array, flatten, split_flat, unflatten

DTYPES = st.sampled_from([
    np.float16, np.float32, np.float64, ">f4", ">f8", np.int8, np.int32, np.int64, np.uint16,
    np.bool_, np.complex64, np.complex128, "<U3", "S2", [("a", "<f4"), ("b", ">i2")],
])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


def assert_same_array(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()
    assert actual.flags.writeable and actual.flags.c_contiguous


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(DTYPES, SHAPES))
def test_encode_writes_the_bytes_flower_writes(array):
    ours, flowers = encode_array(array), Array(array)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (
        flowers.dtype, flowers.shape, flowers.stype, flowers.data
    )


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(DTYPES, SHAPES))
def test_decode_reads_what_numpy_reads(array):
    encoded = Array(array)
    assert_same_array(decode_array(encoded), encoded.numpy())
    assert_same_array(decode_array(encoded), array)


def test_decoded_arrays_are_copies_that_share_nothing():
    encoded = encode_array(np.arange(6.0).reshape(2, 3))
    first = decode_array(encoded)
    first[0, 0] = 99.0
    assert decode_array(encoded)[0, 0] == 0.0


@pytest.mark.parametrize(
    "array",
    [
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.arange(24, dtype=np.float32).reshape(2, 3, 4)[:, ::2, 1:],
        np.arange(10)[::3],
    ],
    ids=["fortran-order", "strided-3d", "strided-1d"],
)
def test_a_non_contiguous_array_is_written_in_c_order(array):
    encoded = encode_array(array)
    assert encoded.data == Array(np.ascontiguousarray(array)).data
    assert_same_array(decode_array(encoded), np.ascontiguousarray(array))


def test_a_zero_dimensional_array_keeps_its_shape():
    assert decode_array(encode_array(np.int64(7))).shape == ()
    assert decode_array(encode_array(np.array(2.5))).shape == ()


def npy_bytes(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    if version is None:
        np.save(buffer, array)
    else:
        np.lib.format.write_array(buffer, array, version=version)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        npy_bytes(np.asfortranarray(np.arange(6.0).reshape(2, 3))),
        npy_bytes(np.arange(6.0).reshape(2, 3), version=(2, 0)),
        npy_bytes(np.arange(6.0).reshape(2, 3), version=(3, 0)),
        npy_bytes(np.arange(6.0).reshape(2, 3)) + b"trailing bytes",
    ],
    ids=["fortran-order", "format-2.0", "format-3.0", "trailing-bytes"],
)
def test_other_valid_npy_files_decode_as_numpy_decodes_them(data):
    decoded = decode_array(Array(dtype="float64", shape=(2, 3), stype="numpy.ndarray", data=data))
    assert decoded.dtype == np.float64 and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, np.arange(6.0).reshape(2, 3), strict=True)


def pickled_objects() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([None, 1], dtype=object), allow_pickle=True)
    return buffer.getvalue()


GOOD = npy_bytes(np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize(
    "data, stype",
    [
        (b"", "numpy.ndarray"),
        (b"not a numpy file", "numpy.ndarray"),
        (GOOD[:-1], "numpy.ndarray"),
        (GOOD[:20], "numpy.ndarray"),
        (GOOD[:8] + b"\xff\xff" + GOOD[10:], "numpy.ndarray"),
        (GOOD.replace(b"'shape': (2, 3)", b"'shape': (2, 9)"), "numpy.ndarray"),
        (GOOD.replace(b"'descr': '<f8'", b"'descr': 'zz'"), "numpy.ndarray"),
        (pickled_objects(), "numpy.ndarray"),
        (GOOD, "torch.tensor"),
    ],
    ids=["empty", "garbage", "one-byte-short", "header-cut", "header-length-past-end",
         "shape-beyond-data", "unknown-dtype", "pickled-objects", "other-stype"],
)
def test_bytes_that_are_not_a_plain_npy_array_raise_value_error(data, stype):
    with pytest.raises(ValueError, match="not a readable numpy array"):
        decode_array(Array(dtype="float64", shape=(2, 3), stype=stype, data=data))


# ------------------------------------------------------------------------------ flat vectors


def test_flatten_copies_tensors_and_split_flat_inverts_it() -> None:
    tensors = [torch.arange(6.0).reshape(2, 3), torch.tensor([7.0]), torch.ones(2, 1, 2)]
    flat = flatten(tensors)
    np.testing.assert_array_equal(flat.numpy(), [0, 1, 2, 3, 4, 5, 7, 1, 1, 1, 1])
    tensors[0][0, 0] = 100.0  # an optimizer step updates parameters in place
    assert flat[0].item() == 0.0
    restored = split_flat(flat, [t.shape for t in tensors])
    assert [piece.shape for piece in restored] == [tensor.shape for tensor in tensors]
    np.testing.assert_array_equal(restored[0].numpy(), [[0, 1, 2], [3, 4, 5]])
    restored[1][0] = -1.0  # views: writing a piece writes the vector
    assert flat[6].item() == -1.0
    with pytest.raises(ValueError, match="does not hold 11 values"):
        split_flat(flat[:-1], [t.shape for t in tensors])


def test_flatten_and_unflatten_round_trip_numpy_arrays_with_their_dtypes() -> None:
    like = {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.array([7], dtype=np.float64)}
    flat = flatten(like)
    assert flat.dtype == np.float64 and flat.tolist() == [0, 1, 2, 3, 4, 5, 7]
    back = unflatten(flat + 0.5, like)
    assert list(back) == ["w", "b"] and back["w"].dtype == np.float32 and back["w"].shape == (3, 2)
    np.testing.assert_array_equal(back["w"], like["w"] + 0.5)
    assert flatten({}).shape == (0,)
    with pytest.raises(ValueError, match="does not hold 7 values"):
        unflatten(flat[:-1], like)
    with pytest.raises(ValueError):
        split_flat(flat.reshape(7, 1), [(7,)])


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_a_header_declaring_more_than_its_bytes_is_refused_before_allocating(version):
    """A header claiming 100 GB in front of 400 bytes: rejected without taking the memory."""
    import tracemalloc

    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (25_000_000_000,)}
    write = {(1, 0): np.lib.format.write_array_header_1_0,
             (2, 0): np.lib.format.write_array_header_2_0}
    if version in write:
        write[version](buffer, header)
    else:  # format 3.0: the 2.0 layout with a utf-8 header and version bytes 3, 0
        np.lib.format.write_array_header_2_0(buffer, header)
        buffer = io.BytesIO(b"\x93NUMPY\x03\x00" + buffer.getvalue()[8:])
    data = buffer.getvalue() + bytes(400)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="header declares shape .* but 400 bytes follow"):
            decode_array(Array(dtype="float32", shape=(25_000_000_000,), stype="numpy.ndarray",
                               data=data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000
