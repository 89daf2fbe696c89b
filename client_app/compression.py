"""The node's half of compressed communication (`task.compression`): decoding the global it is
sent and encoding its reply, with what must outlive the round (the downlink reference, the
top-k residual) collected in `ClientRound.codec_state` for the train handler to save."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord

from client_app.state import ClientStateError
from task import records
from task.compression import (
    DOWNLINK, UPLINK, link_codec, pack, payload_seed, payloads, shifts, unpack,
)
from task.params import flatten, numpy_to_record, record_to_numpy, unflatten

if TYPE_CHECKING:
    from client_app.local import ClientRound

DOWNLINK_ROUND = "codec-downlink-round"  # state: the round of the global kept as reference


class UndecodablePayload(ValueError):
    """The server's message does not decode in the run's downlink codec (the node refuses it)."""


def _reference_key(name: str) -> str:
    return f"codec-downlink-{name}"


def _residual_key(name: str) -> str:
    return f"codec-residual-{name}"


def received_arrays(round_: ClientRound, like: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The message's ArrayRecords as the model's arrays (`like`: keys, shapes, dtypes), decoded
    from the downlink codec where the server compressed them (a train or an evaluate message;
    reference round 0: not a difference); UndecodablePayload names why one cannot be."""
    cfg, config = round_.cfg, round_.config
    codec = link_codec(cfg, DOWNLINK)
    shift = shifts(cfg, codec)
    table = payloads(cfg.strategy, DOWNLINK)
    content = round_.content.array_records
    if records.DOWNLINK_REFERENCE not in config:
        received = {name: record_to_numpy(record) for name, record in content.items()}
    else:
        reference_round = int(config[records.DOWNLINK_REFERENCE])
        differences = shift and reference_round > 0
        saved = round_.state.load() if differences else {}
        size = sum(a.size for a in like.values())
        received = {}
        for name, record in content.items():
            reference = None
            if differences and table[name].shifted:
                reference = _reference(saved, name, reference_round, round_)
            try:
                vector = unpack(record, reference, table[name], codec, size)
            except ValueError as error:
                raise UndecodablePayload(f"the server's '{name}' cannot be decoded: {error}") from None
            with np.errstate(over="ignore"):
                received[name] = unflatten(vector, like)
    if shift:  # the next round's message may be a difference to this one
        round_.codec_state[DOWNLINK_ROUND] = np.int64(round_.server_round)
        for name in table.keys() & received.keys():
            round_.codec_state[_reference_key(name)] = flatten(received[name]).astype(np.float64)
    return received


def _reference(saved: dict, name: str, reference_round: int, round_: ClientRound) -> np.ndarray:
    held = int(saved[DOWNLINK_ROUND]) if DOWNLINK_ROUND in saved else None
    if held != reference_round or _reference_key(name) not in saved:
        what = "none" if held is None else f"round {held}'s"
        raise ClientStateError(
            f"the server sent the global as a difference to round {reference_round}'s, this node "
            f"holds {what} ({round_.state.where()}); it does not train on a wrong global"
        )
    return saved[_reference_key(name)]


def encode_reply(
    round_: ClientRound, vectors: dict[str, np.ndarray], like: dict[str, np.ndarray]
) -> tuple[dict[str, ArrayRecord], dict[str, np.ndarray]]:
    """The reply's ArrayRecords for the flat `vectors` (by record name) in the uplink codec, and
    the vectors as the server will decode them (in the model's dtype, as float64): a client
    whose own bookkeeping depends on what it sent (BayesADMM's duals) uses those."""
    cfg = round_.cfg
    codec = link_codec(cfg, UPLINK)
    if codec.name == "fp32":
        return {name: numpy_to_record(unflatten(v, like)) for name, v in vectors.items()}, dict(vectors)
    table = payloads(cfg.strategy, UPLINK)
    saved = round_.state.load() if codec.keeps_residual else {}
    out, decoded = {}, {}
    for name, vector in vectors.items():
        reference = None
        if shifts(cfg, codec) and table[name].shifted:
            reference = flatten(round_.received[name]).astype(np.float64)
        seed = payload_seed(cfg.seed, round_.server_round, UPLINK, name, round_.seed)
        out[name], back, residual = pack(
            vector, reference, table[name], codec, seed, saved.get(_residual_key(name))
        )
        if residual is not None:
            round_.codec_state[_residual_key(name)] = residual
        with np.errstate(over="ignore"):
            decoded[name] = flatten(unflatten(back, like)).astype(np.float64)
    return out, decoded
