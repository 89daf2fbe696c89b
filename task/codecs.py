"""Codecs for what the nodes and the server send: pure functions on flat float vectors.

A codec turns a 1-D float vector of n values into named parts (small numpy arrays that travel as
Flower Arrays) and back. `fp32` is the identity in float32. `fp16` and `bf16` keep 16 bits per
value (bf16 as the upper half of the float32 bit pattern, rounded to nearest even, in uint16:
numpy has no bfloat16). `q8` keeps one int8 per value and one float32 scale per chunk of
`chunk` values, s = max|x| / 127 over the chunk, and rounds x / s stochastically,
q = floor(x / s + u) with u ~ U[0, 1): E[q s] = x (unbiased) and |q s - x| < s. `topk` keeps
the k = ceil(fraction n) values of largest magnitude, in float32, and their indices (uint32,
ascending); the others decode as 0. What top-k drops is carried to the next round by error
feedback (`encode_with_feedback`), which the sender keeps.

`check_parts` tells whether parts of the right layout (dtype and shape, which `parts_layout`
gives and the record decoder checks before it allocates) hold values the decoder may trust.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

CodecName = Literal["fp32", "fp16", "bf16", "q8", "topk"]
CODECS: tuple[str, ...] = ("fp32", "fp16", "bf16", "q8", "topk")
Q8_LEVELS = 127  # q in [-127, 127]: symmetric, so -x encodes as -q

Parts = dict[str, np.ndarray]


@dataclass(frozen=True)
class Codec:
    name: CodecName = "fp32"
    chunk: int = 256  # q8: values per scale
    fraction: float = 0.01  # topk: share of the values sent

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}; known: {', '.join(CODECS)}")
        if self.chunk < 1:
            raise ValueError(f"codec chunk must be at least 1, got {self.chunk}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"top-k fraction must lie in (0, 1], got {self.fraction}")

    def topk_count(self, size: int) -> int:
        return min(size, max(1, math.ceil(self.fraction * size))) if size else 0

    def parts_layout(self, size: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The dtype and shape of every part that encodes a vector of `size` values."""
        if self.name == "fp32":
            return {"values": (np.dtype(np.float32), (size,))}
        if self.name == "fp16":
            return {"values": (np.dtype(np.float16), (size,))}
        if self.name == "bf16":
            return {"values": (np.dtype(np.uint16), (size,))}
        if self.name == "q8":
            chunks = math.ceil(size / self.chunk)
            return {"values": (np.dtype(np.int8), (size,)), "scales": (np.dtype(np.float32), (chunks,))}
        k = self.topk_count(size)
        return {"indices": (np.dtype(np.uint32), (k,)), "values": (np.dtype(np.float32), (k,))}

    def encode(self, vector: np.ndarray, seed: int = 0) -> Parts:
        """The parts of a finite 1-D `vector`; `seed` drives q8's stochastic rounding."""
        vector = np.asarray(vector, dtype=np.float64)
        if vector.ndim != 1:
            raise ValueError(f"codecs encode 1-D vectors, got shape {vector.shape}")
        if self.name == "fp32":
            return {"values": vector.astype(np.float32)}
        if self.name == "fp16":
            return {"values": vector.astype(np.float16)}
        if self.name == "bf16":
            return {"values": bf16_bits(vector.astype(np.float32))}
        if self.name == "q8":
            return quantize_q8(vector, self.chunk, np.random.default_rng(seed))
        k = self.topk_count(vector.size)
        indices = np.sort(np.argpartition(-np.abs(vector), k - 1)[:k]) if k else np.zeros(0, int)
        return {"indices": indices.astype(np.uint32), "values": vector[indices].astype(np.float32)}

    def decode(self, parts: Parts, size: int) -> np.ndarray:
        """The float64 vector of `size` values the parts stand for."""
        if self.name in ("fp32", "fp16"):
            return parts["values"].astype(np.float64)
        if self.name == "bf16":
            return (parts["values"].astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if self.name == "q8":
            scales = np.repeat(parts["scales"].astype(np.float64), self.chunk)[:size]
            return parts["values"].astype(np.float64) * scales
        vector = np.zeros(size)
        vector[parts["indices"].astype(np.int64)] = parts["values"]
        return vector

    def check_parts(self, parts: Parts, size: int) -> str | None:
        """Why parts of the right layout cannot be decoded into a finite vector, or None."""
        if self.name == "q8":
            scales, values = parts["scales"], parts["values"]
            if not (np.isfinite(scales).all() and (scales >= 0).all()):
                return "q8 scales must be finite and >= 0"
            if (values < -Q8_LEVELS).any():
                return f"q8 values must lie in [-{Q8_LEVELS}, {Q8_LEVELS}]"
        elif self.name == "topk":
            indices = parts["indices"]
            if indices.size and int(indices.max()) >= size:
                return f"top-k index {int(indices.max())} out of range for {size} values"
            if (np.diff(indices.astype(np.int64)) <= 0).any():
                return "top-k indices must be strictly increasing (no duplicates)"
            if not np.isfinite(parts["values"]).all():
                return "top-k values must be finite"
        elif self.name == "bf16":
            if ((parts["values"] & 0x7F80) == 0x7F80).any():  # exponent all ones: inf or NaN
                return "bf16 values must be finite"
        elif not np.isfinite(parts["values"]).all():
            return f"{self.name} values must be finite"
        return None

    @property
    def drops_values(self) -> bool:
        """Whether most values decode as 0 (top-k): it carries differences to a reference the
        receiver holds, never a model's weights on their own."""
        return self.name == "topk"

    @property
    def keeps_residual(self) -> bool:
        """Whether the sender carries what it did not send into its next message (top-k)."""
        return self.name == "topk"


def bf16_bits(vector: np.ndarray) -> np.ndarray:
    """The upper 16 bits of float32 values, rounded to nearest even (finite inputs)."""
    bits = vector.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def quantize_q8(vector: np.ndarray, chunk: int, rng: np.random.Generator) -> Parts:
    """Unbiased 8-bit stochastic rounding with one float32 scale per chunk of values."""
    size = vector.size
    chunks = math.ceil(size / chunk)
    padded = np.zeros(chunks * chunk)
    padded[:size] = vector
    peaks = np.abs(padded.reshape(chunks, chunk)).max(axis=1) if chunks else np.zeros(0)
    scales = (peaks / Q8_LEVELS).astype(np.float32)
    # float32 may round the scale down: step it up until 127 s covers the peak, so |x / s| <= 127.
    short = scales.astype(np.float64) * Q8_LEVELS < peaks
    scales[short] = np.nextafter(scales[short], np.float32(np.inf))
    per_value = np.repeat(scales.astype(np.float64), chunk)[:size]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(per_value > 0, vector / per_value, 0.0)
    levels = np.floor(ratio + rng.random(size))
    return {"values": np.clip(levels, -Q8_LEVELS, Q8_LEVELS).astype(np.int8), "scales": scales}


def encode_with_feedback(
    codec: Codec, vector: np.ndarray, residual: np.ndarray | None, seed: int = 0
) -> tuple[Parts, np.ndarray]:
    """Error feedback: encode `vector` + `residual` and return the parts and the new residual,
    exactly what the parts leave out of it (corrected - decoded)."""
    corrected = np.asarray(vector, dtype=np.float64)
    if residual is not None:
        corrected = corrected + residual
    parts = codec.encode(corrected, seed)
    return parts, corrected - codec.decode(parts, corrected.size)


def to_wire(vector: np.ndarray, reference: np.ndarray | None, log: bool) -> np.ndarray:
    """What a codec encodes for `vector`: its logarithm when `log` (a precision: positive), minus
    the reference's (in the same domain) when both sides hold one."""
    values = np.log(vector) if log else np.asarray(vector, dtype=np.float64)
    if reference is not None:
        values = values - (np.log(reference) if log else reference)
    return values


def from_wire(decoded: np.ndarray, reference: np.ndarray | None, log: bool) -> np.ndarray:
    """The inverse of `to_wire`: a log-precision comes back as exp(.), positive by construction
    (0 only where it underflows, which the receiver's checks reject)."""
    values = decoded
    if reference is not None:
        values = values + (np.log(reference) if log else reference)
    if log:
        with np.errstate(over="ignore"):
            values = np.exp(values)
    return values
