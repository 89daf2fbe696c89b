"""Moving model parameters between torch modules, Flower records and flat vectors."""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from torch import nn

# Flower's Array holds a .npy file. Writing and parsing its header (a Python dict literal) is
# most of what `Array(ndarray)` and `Array.numpy()` cost on a small array, and a federation sends
# the same few headers (one per model tensor) in every message: each distinct one is made once.
_NPY_V1_MAGIC = b"\x93NUMPY\x01\x00"


def encode_array(ndarray: np.ndarray) -> Array:
    """The array in C order as a Flower Array: `Array(ndarray)`, byte for byte, for an array
    that is C-contiguous already."""
    ndarray = np.asarray(ndarray)
    if not ndarray.flags.c_contiguous:  # then ndim >= 1, which np.ascontiguousarray keeps
        ndarray = np.ascontiguousarray(ndarray)
    header = _npy_v1_header(ndarray.dtype, ndarray.shape)
    if header is None:  # a header np.save writes in another format version, or pickles: let it
        return Array(ndarray)
    return Array(
        dtype=str(ndarray.dtype), shape=tuple(ndarray.shape), stype=SType.NUMPY,
        data=header + ndarray.tobytes(),
    )


def decode_array(
    array: Array, dtype: np.dtype | None = None, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """`array.numpy()`: a new writable array; ValueError if the Array is not a plain .npy array
    (its bytes come from another node and may be anything), or, when `dtype` or `shape` is
    given, if its header declares another, checked before anything is copied."""
    data = array.data
    if array.stype == SType.NUMPY and data[:8] == _NPY_V1_MAGIC and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], "little")
        layout = _npy_v1_layout(bytes(data[:end]))
        if layout is not None:
            _check_expected(layout[0], layout[1], dtype, shape)
            found, found_shape, count = layout
            if len(data) == end + count * found.itemsize:
                return np.frombuffer(data, found, count, end).reshape(found_shape).copy()
            if dtype is not None or shape is not None:
                raise ValueError(
                    f"header declares shape {found_shape} of {found}, {count * found.itemsize} "
                    f"bytes, but {len(data) - end} bytes follow"
                )
    if dtype is not None or shape is not None:  # an expected layout comes in the plain format only
        raise ValueError("not a plain .npy array (format 1.0, C order)")
    _check_declared_size(data)
    try:  # anything unusual: numpy's own reader, and its verdict
        return array.numpy()
    except Exception as error:
        raise ValueError(f"not a readable numpy array ({type(error).__name__}: {error})") from error


def _check_expected(
    dtype: np.dtype, shape: tuple[int, ...], want_dtype: np.dtype | None, want_shape: tuple | None
) -> None:
    if want_dtype is not None and dtype != np.dtype(want_dtype):
        raise ValueError(f"has dtype {dtype}, expected {np.dtype(want_dtype)}")
    if want_shape is not None and tuple(shape) != tuple(want_shape):
        raise ValueError(f"has shape {tuple(shape)}, expected {tuple(want_shape)}")


def _check_declared_size(data: bytes) -> None:
    """ValueError if a .npy header declares more bytes than follow it.

    numpy's reader allocates the declared shape before it reads the data: a header claiming
    100 GB in front of 400 bytes would take the memory first and fail after.
    """
    stream = io.BytesIO(data)
    try:
        if np.lib.format.read_magic(stream) == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:  # 2.0 and 3.0 differ only in the header's length field and its text encoding
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except Exception:
        return  # not a header numpy can read: its own reader names the problem
    needed = math.prod(shape) * dtype.itemsize
    if needed > len(data) - stream.tell():
        raise ValueError(
            f"not a readable numpy array (header declares shape {shape} of {dtype}, "
            f"{needed} bytes, but {len(data) - stream.tell()} bytes follow)"
        )


@functools.lru_cache(maxsize=256)
def _npy_v1_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes | None:
    if dtype.hasobject:
        return None
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:  # too long for format 1.0: np.save moves on to 2.0
        return None
    return buffer.getvalue()


@functools.lru_cache(maxsize=256)
def _npy_v1_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    try:
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(io.BytesIO(header[8:]))
    except Exception:
        return None
    if fortran_order or dtype.hasobject:
        return None
    return dtype, shape, math.prod(shape)


def model_to_record(model: nn.Module) -> ArrayRecord:
    return ArrayRecord(
        {k: encode_array(v.detach().cpu().numpy()) for k, v in model.state_dict().items()}
    )


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: decode_array(record[k]) for k in record.keys()}


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: encode_array(v) for k, v in arrays.items()})


def load_record(model: nn.Module, record: ArrayRecord) -> None:
    load_arrays(model, record_to_numpy(record))


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy `arrays` (one per state-dict key, no more, no fewer) into the model's parameters."""
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=True)


# Flat vectors: every method's math sees a model as one 1-D vector, the keys (or tensors) one
# after another. The same helpers serve numpy arrays (records) and torch tensors (optimizers).
Vector = np.ndarray | torch.Tensor


def flatten(arrays: Mapping[str, Vector] | Sequence[Vector]) -> Vector:
    """A new 1-D vector of `arrays` in order (a mapping's values): numpy arrays give a numpy
    array, torch tensors a detached tensor that no in-place step changes."""
    pieces = list(arrays.values()) if isinstance(arrays, Mapping) else list(arrays)
    if pieces and isinstance(pieces[0], torch.Tensor):
        return torch.cat([piece.detach().reshape(-1) for piece in pieces])
    return np.concatenate([np.ravel(piece) for piece in pieces]) if pieces else np.zeros(0)


def split_flat(vector: Vector, shapes: Sequence[Sequence[int]]) -> list[Vector]:
    """Views of a 1-D `vector` shaped as `shapes`, in order (the inverse of `flatten`)."""
    sizes = [math.prod(shape) for shape in shapes]
    if vector.ndim != 1 or len(vector) != sum(sizes):
        raise ValueError(
            f"a vector of shape {tuple(vector.shape)} does not hold {sum(sizes)} values"
        )
    pieces, offset = [], 0
    for shape, size in zip(shapes, sizes):
        pieces.append(vector[offset : offset + size].reshape(tuple(shape)))
        offset += size
    return pieces


def unflatten(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`vector` as arrays with `like`'s keys, shapes and dtypes (new arrays)."""
    pieces = split_flat(vector, [ref.shape for ref in like.values()])
    return {key: piece.astype(ref.dtype) for (key, ref), piece in zip(like.items(), pieces)}


def record_bytes(record: ArrayRecord) -> int:
    return int(record.count_bytes())
