"""Compressed communication through the strategies and the ClientApp (task/compression.py):
malformed payloads rejected before decoding, the downlink reference, BayesADMM's duals under
lossy codecs, fp32 bit-identical, compressed federations that learn."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType

from benchmarks.inprocess import InProcessGrid, default_run_config, simulate
from client_app.bayes_admm import committed_duals
from client_app.state import ClientState
from strategies import STRATEGIES
from strategies.fedavg import FedAvg
from task import records
from task.codecs import Codec
from task.compression import DOWNLINK, Payload, pack, parts_record, payloads, unpack
from task.config import ConfigError, parse_run_config
from task.data import data_spec
from task.methods import METHODS
from task.models import build_model
from task.params import decode_array, model_to_record
from tests.conftest import reply

SIZE, CHUNK = 10, 4  # a model of one 10-value tensor; q8 chunks of 4: 3 scales


def _record(w) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32))})


def _strategy(**overrides) -> FedAvg:
    cfg = parse_run_config({"min-train-nodes": 1, "codec-chunk": CHUNK, **overrides})
    return FedAvg(cfg, _record(np.zeros(SIZE)))


def _reply(instruction: Message, arrays: ArrayRecord, n: int = 10) -> Message:
    return reply(instruction, RecordDict({
        records.ARRAYS: arrays,
        records.METRICS: MetricRecord({records.NUM_EXAMPLES: n}),
    }))


def _q8(values=None, scales=None) -> ArrayRecord:
    return parts_record({
        "values": np.zeros(SIZE, np.int8) if values is None else values,
        "scales": np.ones(3, np.float32) if scales is None else scales,
    })


def _claiming(shape: tuple[int, ...], dtype: str, data_bytes: int) -> Array:
    """An Array whose .npy header declares `shape` but is followed by `data_bytes` bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    )
    data = header.getvalue() + bytes(data_bytes)
    return Array(dtype=dtype, shape=shape, stype=SType.NUMPY, data=data)


def _huge_values() -> ArrayRecord:
    record = _q8()
    record["values"] = _claiming((SIZE,), "int8", 3)
    return record


def _wrong_claim() -> ArrayRecord:
    record = _q8()
    record["values"] = _claiming((10**12,), "int8", SIZE)  # 1 TB declared, never allocated
    return record


@pytest.mark.parametrize(
    "codec, payload, reason",
    [
        ("q8", lambda: _q8(values=np.zeros(SIZE - 1, np.int8)), "has shape (9,), expected (10,)"),
        ("q8", lambda: _q8(scales=np.ones(2, np.float32)), "has shape (2,), expected (3,)"),
        ("q8", lambda: _q8(scales=np.array([1, np.inf, 1], np.float32)), "finite"),
        ("q8", lambda: _q8(values=np.zeros(SIZE, np.float32)), "has dtype float32, expected int8"),
        ("q8", _huge_values, "bytes follow"),
        ("q8", _wrong_claim, "has shape (1000000000000,)"),
        ("q8", lambda: parts_record({"values": np.zeros(SIZE, np.int8)}), "has parts"),
        ("q8", lambda: _record(np.zeros(SIZE)), "has parts ['w']"),
        ("topk", lambda: parts_record({"indices": np.array([10], np.uint32),
                                       "values": np.ones(1, np.float32)}), "out of range"),
        ("topk", lambda: parts_record({"indices": np.array([2, 2], np.uint32),
                                       "values": np.ones(2, np.float32)}), "has shape (2,)"),
        ("bf16", lambda: parts_record({"values": np.full(SIZE, 0x7F80, np.uint16)}), "finite"),
    ],
)
def test_a_malformed_compressed_reply_is_rejected_with_its_reason(fake_grid, codec, payload, reason):
    strategy = _strategy(**{"uplink-codec": codec, "topk-fraction": 0.1})
    msgs = list(strategy.configure_train(1, _record(np.zeros(SIZE)), ConfigRecord(), fake_grid([1, 2])))
    good, sent, _ = pack(np.linspace(1, 2, SIZE), np.zeros(SIZE),
                         payloads("fedavg", "uplink")[records.ARRAYS], strategy.uplink, seed=0)
    arrays, _ = strategy.aggregate_train(1, [_reply(msgs[0], good), _reply(msgs[1], payload())])
    assert strategy.last_round.accepted == 1 and strategy.last_round.rejected == 1
    assert f"'{records.ARRAYS}' payload rejected" in strategy.last_round.reasons[0]
    assert reason in strategy.last_round.reasons[0]
    # The good reply alone made the round: the global is what it decodes to.
    np.testing.assert_array_equal(arrays["w"].numpy(), sent.astype(np.float32))


def test_topk_duplicate_indices_are_rejected():
    codec = Codec("topk", fraction=0.2)  # k = 2 of 10
    record = parts_record({"indices": np.array([3, 3], np.uint32), "values": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match="strictly increasing"):
        unpack(record, None, Payload(log=False, shifted=False), codec, SIZE)


def test_topk_and_the_weights_themselves_need_the_shift():
    with pytest.raises(ConfigError, match="'uplink-codec' = 'topk'.*codec-reference"):
        parse_run_config({"uplink-codec": "topk", "codec-reference": "none"})
    with pytest.raises(ConfigError, match="'downlink-codec' = 'topk'"):
        parse_run_config({"strategy": "fedpa", "downlink-codec": "topk", "codec-reference": "none"})
    # A FedPA reply is a delta already.
    parse_run_config({"strategy": "fedpa", "uplink-codec": "topk", "codec-reference": "none"})
    with pytest.raises(ConfigError, match="'uplink-codec' = 'q4'"):
        parse_run_config({"uplink-codec": "q4"})


def test_downlink_shift_goes_to_the_nodes_that_hold_the_last_global(fake_grid):
    strategy = _strategy(**{"downlink-codec": "q8", "codec-reference": "shift"})
    grid = fake_grid([1, 2, 3])
    first = list(strategy.configure_train(1, _record(np.arange(SIZE)), ConfigRecord(), grid))
    # Round 1: nobody holds a reference, everyone gets the global itself.
    assert all(records.DOWNLINK_REFERENCE not in m.content[records.CONFIG] for m in first)
    np.testing.assert_array_equal(decode_array(first[0].content[records.ARRAYS]["w"]), np.arange(SIZE))
    round_one = strategy.sent[records.ARRAYS].copy()
    # Nodes 1 and 2 reply (so they saved the global), node 3 fails.
    strategy.aggregate_train(1, [_reply(first[0], _record(np.full(SIZE, 2.0))),
                                 _reply(first[1], _record(np.full(SIZE, 4.0)))])
    second = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        2, _record(np.full(SIZE, 3.0)), ConfigRecord(), grid)}
    assert {n for n, m in second.items() if records.DOWNLINK_REFERENCE in m.content[records.CONFIG]} == {1, 2}
    assert second[1].content[records.CONFIG][records.DOWNLINK_REFERENCE] == 1
    # The difference decodes, on round one's global, to exactly what node 3 gets in full.
    payload = payloads("fedavg", DOWNLINK)[records.ARRAYS]
    shifted = unpack(second[1].content[records.ARRAYS], round_one, payload, strategy.downlink, SIZE)
    full = decode_array(second[3].content[records.ARRAYS]["w"])
    np.testing.assert_array_equal(shifted.astype(np.float32), full)
    np.testing.assert_array_equal(strategy.params[0], full)  # the server's deltas start there too
    np.testing.assert_allclose(full, 3.0, atol=0.1)


def _run_config(**overrides):
    return {**default_run_config(), "model": "logreg", "local-epochs": 1,
            "fraction-evaluate": 0.0, **overrides}


def test_a_node_without_the_downlink_reference_refuses_to_train():
    run_config = _run_config(**{"downlink-codec": "q8", "codec-reference": "shift"})
    cfg = parse_run_config(run_config)
    grid = InProcessGrid(run_config, num_nodes=2)
    strategy = STRATEGIES["fedavg"](cfg, model_to_record(build_model(cfg, data_spec(cfg))))
    arrays = model_to_record(build_model(cfg, data_spec(cfg)))
    for server_round in (1, 2):
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        assert not any(r.has_error() for r in replies)
        arrays, _ = strategy.aggregate_train(server_round, replies)
    grid.contexts[1].state = RecordDict()  # node 1 lost its state (memory only here)
    replies = grid.send_and_receive(strategy.configure_train(3, arrays, ConfigRecord(), grid))
    errors = {r.metadata.src_node_id: r.error.reason for r in replies if r.has_error()}
    assert list(errors) == [1] and "difference to round 2's, this node holds none" in errors[1]


@pytest.mark.parametrize("uplink, downlink", [("q8", "q8"), ("topk", "bf16")])
def test_bayes_admm_dual_sums_match_the_clients_under_lossy_codecs(uplink, downlink):
    run_config = _run_config(**{
        **METHODS["bayes-admm"].short_run, "strategy": "bayes-admm", "dual-damping": 0.5,
        "uplink-codec": uplink, "downlink-codec": downlink,
        "topk-fraction": 0.1, "codec-reference": "shift",
    })
    cfg = parse_run_config(run_config)
    grid = InProcessGrid(run_config, num_nodes=3)
    strategy = STRATEGIES["bayes-admm"](cfg, model_to_record(build_model(cfg, data_spec(cfg))))
    for server_round in (1, 2, 3):
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        strategy.aggregate_train(server_round, replies)
        assert strategy.last_round.accepted == 3, strategy.last_round.reasons
        held = [committed_duals(ClientState(grid.contexts[n]).load(),
                                strategy.accepted_round.get(n, 0), strategy.mean.size)
                for n in grid.contexts]
        np.testing.assert_allclose(sum(v for v, _ in held), strategy.duals.mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sum(V for _, V in held), strategy.duals.precision, rtol=1e-9, atol=1e-12)
        assert (strategy.precision > 0).all()
    if uplink == "topk":  # every node keeps what it has not sent yet, per record
        saved = ClientState(grid.contexts[1]).load()
        assert {"codec-residual-arrays", "codec-residual-precision"} <= set(saved)
        assert np.abs(saved["codec-residual-arrays"]).sum() > 0


SHORT = {"num-server-rounds": 3, "model": "logreg", "local-epochs": 1, "fraction-evaluate": 0.0}
_RUNS: dict[tuple, list[dict]] = {}


def _rounds(strategy: str, tmp_path, **codecs) -> list[dict]:
    """The per-round results of a short in-process federation (cached per setting)."""
    key = (strategy, tuple(sorted(codecs.items())))
    if key not in _RUNS:
        overrides = {**SHORT, "strategy": strategy, **METHODS[strategy].short_run, **codecs,
                     # Names of one length: the state folder's path travels in every message.
                     "output-dir": str(tmp_path / f"run{len(_RUNS):03d}")}
        if strategy == "bayes-admm":
            overrides["eval-mc-samples"] = 2
        _RUNS[key] = simulate(overrides, num_nodes=4).results["rounds"]
    return _RUNS[key]


def test_fp32_leaves_every_result_bit_identical(tmp_path):
    default = _rounds("bayes-admm", tmp_path)
    explicit = _rounds("bayes-admm", tmp_path, **{
        "uplink-codec": "fp32", "downlink-codec": "fp32", "codec-reference": "none",
        "codec-chunk": 7, "topk-fraction": 0.5})
    strip = lambda rounds: [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]  # noqa: E731
    for ours, theirs in zip(strip(default), strip(explicit)):
        assert ours == theirs, {k: (v, theirs.get(k)) for k, v in ours.items() if v != theirs.get(k)}
    assert all(r["compression_up"] == 1.0 and r["compression_down"] == 1.0 for r in default)


def test_fp32_sends_the_records_of_before_byte_for_byte(fake_grid):
    strategy = _strategy()
    weights = _record(np.linspace(-1, 1, SIZE))
    msgs = list(strategy.configure_train(1, weights, ConfigRecord(), fake_grid([1])))
    assert msgs[0].content[records.ARRAYS]["w"].data == weights["w"].data
    assert records.DOWNLINK_REFERENCE not in msgs[0].content[records.CONFIG]


@pytest.mark.parametrize(
    "strategy, codecs, slack",
    [
        ("fedavg", {"uplink-codec": "q8", "downlink-codec": "q8"}, 0.05),
        # Top-k sends a tenth of each update: in three rounds error feedback has not caught up.
        ("fedavg", {"uplink-codec": "topk", "topk-fraction": 0.1}, 0.2),
        ("fedpa", {"uplink-codec": "q8", "downlink-codec": "fp16"}, 0.05),
        ("bayes-admm", {"uplink-codec": "q8", "downlink-codec": "q8"}, 0.05),
    ],
)
def test_compressed_federations_learn(tmp_path, strategy, codecs, slack):
    baseline = _rounds(strategy, tmp_path)
    compressed = _rounds(strategy, tmp_path, **codecs)
    assert all(r["replies"] == 4 and not r["problems"] for r in compressed), compressed
    assert compressed[-1]["accuracy"] > 0.15  # ten classes: chance is 0.1
    assert compressed[-1]["accuracy"] >= baseline[-1]["accuracy"] - slack
    assert compressed[-1]["compression_up"] > 2 and compressed[0]["bytes_up"] < baseline[0]["bytes_up"]
