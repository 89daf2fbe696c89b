"""Compressed messages: which records pass through a codec, and the Flower records that carry
the codec's parts (the math is in `task.codecs`; both the ServerApp and the ClientApp use this).

A compressed ArrayRecord holds the codec's parts under their names ("values", "scales",
"indices") instead of one array per model tensor; the receiver knows the codec from the run
config and the vector's length from the model. A precision (BayesADMM) travels as its logarithm,
so whatever the codec does to it comes back positive. With `codec-reference = "shift"` a payload
that both sides can anchor travels as its difference to that anchor (DIANA-style): uplink, the
global the node received (a FedPA delta is a difference already); downlink, the previous round's
global as the nodes decoded it. `fp32` sends every record as before, one array per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord

from task import records
from task.codecs import Codec, Parts, encode_with_feedback, from_wire, to_wire
from task.config import RunConfig
from task.params import decode_array, encode_array

UPLINK, DOWNLINK = "uplink", "downlink"
EVALUATE = "evaluate"  # the global in an evaluate message: downlink codec, its own q8 rounding seed


@dataclass(frozen=True)
class Payload:
    log: bool  # a precision: sent as its logarithm
    shifted: bool  # sent as the difference to a reference both sides hold (codec-reference shift)


def payloads(strategy: str, direction: str) -> dict[str, Payload]:
    """The ArrayRecords a message of `strategy` carries in `direction`, and how each travels."""
    # A FedPA reply is a delta already: it has nothing to subtract.
    weights = Payload(log=False, shifted=not (strategy == "fedpa" and direction == UPLINK))
    out = {records.ARRAYS: weights}
    if strategy == "bayes-admm":
        out[records.PRECISION] = Payload(log=True, shifted=True)
    return out


def link_codec(cfg: RunConfig, direction: str) -> Codec:
    name = cfg.uplink_codec if direction == UPLINK else cfg.downlink_codec
    return Codec(name, chunk=cfg.codec_chunk, fraction=cfg.topk_fraction)


def shifts(cfg: RunConfig, codec: Codec) -> bool:
    """Whether payloads marked `shifted` travel as differences to their reference."""
    return cfg.codec_reference == "shift" and codec.name != "fp32"


def parts_record(parts: Parts) -> ArrayRecord:
    return ArrayRecord({key: encode_array(value) for key, value in parts.items()})


def read_parts(record: ArrayRecord, codec: Codec, size: int) -> Parts:
    """The parts in `record`, checked against the layout `codec` gives for `size` values before
    any of them is copied, then for values the decoder must not trust; ValueError names why."""
    layout = codec.parts_layout(size)
    if set(record.keys()) != set(layout):
        raise ValueError(f"{codec.name} payload has parts {sorted(record.keys())}, expected {sorted(layout)}")
    parts = {}
    for key, (dtype, shape) in layout.items():
        try:
            parts[key] = decode_array(record[key], dtype=dtype, shape=shape)
        except ValueError as error:
            raise ValueError(f"{codec.name} part '{key}': {error}") from None
    problem = codec.check_parts(parts, size)
    if problem is not None:
        raise ValueError(problem)
    return parts


def pack(
    vector: np.ndarray,
    reference: np.ndarray | None,
    payload: Payload,
    codec: Codec,
    seed: int,
    residual: np.ndarray | None = None,
) -> tuple[ArrayRecord, np.ndarray, np.ndarray | None]:
    """(record, the vector as the receiver decodes it, the new error-feedback residual or None).

    `reference` (None: not shifted) is in the vector's own domain (a precision, not its log).
    """
    wire = to_wire(vector, reference, payload.log)
    if codec.keeps_residual:
        parts, residual = encode_with_feedback(codec, wire, residual, seed)
    else:
        parts, residual = codec.encode(wire, seed), None
    decoded = from_wire(codec.decode(parts, wire.size), reference, payload.log)
    return parts_record(parts), decoded, residual


def unpack(
    record: ArrayRecord, reference: np.ndarray | None, payload: Payload, codec: Codec, size: int
) -> np.ndarray:
    """The float64 vector a packed record stands for; ValueError (before decoding allocates)
    when the record is malformed."""
    parts = read_parts(record, codec, size)
    return from_wire(codec.decode(parts, size), reference, payload.log)


def payload_seed(seed: int, server_round: int, direction: str, name: str, who: int = 0) -> int:
    """A seed for q8's rounding, distinct per run, round, direction, record and sender."""
    salt = sum(map(ord, f"{direction}/{name}"))
    return (seed * 1_000_003 + server_round * 10_007 + who * 101 + salt) % 2**32
