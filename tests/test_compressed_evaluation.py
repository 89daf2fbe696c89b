"""Evaluate messages in the downlink codec (task/compression.py, strategies/base.py
`evaluate_arrays`, client_app/compression.py): the node evaluates exactly what the codec decodes,
refuses a malformed payload with its reason, fp32 sends what it always sent, and
`eval_bytes_down` counts the encoded bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType

from benchmarks.inprocess import InProcessGrid, default_run_config, simulate
from client_app.app import _round
from strategies import STRATEGIES
from task import records
from task.codecs import Codec
from task.compression import DOWNLINK, EVALUATE, pack, parts_record, payload_seed, payloads
from task.config import parse_run_config
from task.data import data_spec
from task.models import build_model
from task.params import flatten, model_to_record, record_to_numpy

NODES = 3
Q8 = {"downlink-codec": "q8"}  # codec-reference stays "shift", the default


def _run_config(**overrides) -> dict:
    return {**default_run_config(), "local-epochs": 1, **overrides}


def _federation(**overrides):
    """(strategy, grid) of a FedAvg federation of NODES in-process nodes."""
    run_config = _run_config(**overrides)
    cfg = parse_run_config(run_config)
    strategy = STRATEGIES["fedavg"](cfg, model_to_record(build_model(cfg, data_spec(cfg))))
    return strategy, InProcessGrid(run_config, NODES)


@pytest.fixture(scope="module")
def trained() -> ArrayRecord:
    """A global FedAvg trained for two rounds in fp32: an evaluation that means something."""
    strategy, grid = _federation()
    arrays = model_to_record(build_model(strategy.cfg, data_spec(strategy.cfg)))
    for server_round in (1, 2):
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays


def _evaluate_messages(strategy, grid, arrays, server_round: int = 3):
    return list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))


@pytest.mark.parametrize("downlink", ["fp32", "topk"])
def test_fp32_and_topk_evaluate_messages_carry_the_global_as_before(trained, downlink):
    # Top-k carries differences to a reference only: the global itself goes uncompressed.
    strategy, grid = _federation(**{"downlink-codec": downlink})
    for msg in _evaluate_messages(strategy, grid, trained):
        sent = msg.content[records.ARRAYS]
        assert list(sent.keys()) == list(trained.keys())
        assert all(sent[key].data == trained[key].data for key in trained.keys())
        assert records.DOWNLINK_REFERENCE not in msg.content[records.CONFIG]


def test_a_q8_evaluate_message_is_evaluated_as_the_codec_decodes_it(trained):
    strategy, grid = _federation(**Q8)
    msgs = _evaluate_messages(strategy, grid, trained)
    assert len(msgs) == NODES
    content = msgs[0].content
    assert sorted(content[records.ARRAYS].keys()) == ["scales", "values"]
    assert content[records.CONFIG][records.DOWNLINK_REFERENCE] == 0  # not a difference
    # What `pack` decodes for the global itself, rounded with the evaluate messages' own seed.
    vector = flatten(record_to_numpy(trained)).astype(np.float64)
    seed = payload_seed(strategy.cfg.seed, 3, EVALUATE, records.ARRAYS)
    assert seed != payload_seed(strategy.cfg.seed, 3, DOWNLINK, records.ARRAYS)
    record, decoded, _ = pack(vector, None, payloads("fedavg", DOWNLINK)[records.ARRAYS],
                              strategy.downlink, seed)
    assert all(record[key].data == content[records.ARRAYS][key].data for key in record.keys())
    # The node (fresh: it holds no shift reference) loads exactly that into its model.
    round_, _ = _round(msgs[0], grid.contexts[msgs[0].metadata.dst_node_id])
    evaluated = flatten({k: v.cpu().numpy() for k, v in round_.model_at().state_dict().items()})
    np.testing.assert_array_equal(evaluated, decoded.astype(np.float32))
    assert np.abs(decoded - vector).max() > 0  # q8 did round
    # Its metrics stay close to the fp32 global's on the same nodes.
    fp32_strategy, fp32_grid = _federation()
    q8_metrics = strategy.aggregate_evaluate(3, grid.send_and_receive(msgs))
    fp32_metrics = fp32_strategy.aggregate_evaluate(
        3, fp32_grid.send_and_receive(_evaluate_messages(fp32_strategy, fp32_grid, trained)))
    assert strategy.last_evaluate.accepted == NODES, strategy.last_evaluate.reasons
    assert fp32_metrics["accuracy"] > 0.5  # trained: far above chance (0.1)
    assert abs(q8_metrics["accuracy"] - fp32_metrics["accuracy"]) <= 0.02
    assert q8_metrics["nll"] == pytest.approx(fp32_metrics["nll"], rel=0.02)


def _claiming_a_terabyte() -> ArrayRecord:
    """q8 parts whose values' .npy header declares 10**12 int8 values over 10 bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|i1", "fortran_order": False, "shape": (10**12,)})
    values = Array(dtype="int8", shape=(10**12,), stype=SType.NUMPY,
                   data=header.getvalue() + bytes(10))
    return ArrayRecord({"values": values, "scales": Array(np.ones(1, np.float32))})


@pytest.mark.parametrize(
    "payload, reason",
    [
        (lambda size: parts_record({"values": np.zeros(size, np.int8),
                                    "scales": np.ones(1, np.float32)}), "part 'scales': has shape (1,)"),
        (lambda size: parts_record({"values": np.zeros(size, np.int8),
                                    "scales": np.full(Codec("q8").parts_layout(size)["scales"][1],
                                                      np.nan, np.float32)}), "finite"),
        (lambda size: _claiming_a_terabyte(), "has shape (1000000000000,)"),
    ],
)
def test_a_malformed_evaluate_payload_gets_an_error_reply_naming_it(trained, payload, reason):
    strategy, grid = _federation(**Q8)
    msg = _evaluate_messages(strategy, grid, trained)[0]
    msg.content[records.ARRAYS] = payload(strategy.size)
    replies = grid.send_and_receive([msg])
    assert replies[0].has_error()
    assert "the server's 'arrays' cannot be decoded" in replies[0].error.reason
    assert reason in replies[0].error.reason
    assert strategy.aggregate_evaluate(3, replies) is None
    assert strategy.last_evaluate.failed == 1 and reason in strategy.last_evaluate.reasons[0]


def test_a_malformed_train_payload_gets_the_same_error_reply(trained):
    strategy, grid = _federation(**Q8, **{"codec-reference": "none"})  # round 1 compressed too
    msg = list(strategy.configure_train(1, trained, ConfigRecord(), grid))[0]
    msg.content[records.ARRAYS] = _claiming_a_terabyte()
    replies = grid.send_and_receive([msg])
    assert replies[0].has_error()
    assert "the server's 'arrays' cannot be decoded" in replies[0].error.reason
    assert "has shape (1000000000000,)" in replies[0].error.reason


SHORT = {"num-server-rounds": 2, "local-epochs": 1, "fraction-evaluate": 1.0}


def _rounds(tmp_path, name: str, **overrides) -> list[dict]:
    # Names of one length: the state folder's path travels in every message's config.
    outputs = simulate({**SHORT, **overrides, "output-dir": str(tmp_path / name)}, num_nodes=NODES)
    return outputs.results["rounds"]


def test_q8_evaluate_messages_take_about_a_quarter_of_the_bytes(tmp_path):
    fp32 = _rounds(tmp_path, "run-a")
    explicit = _rounds(tmp_path, "run-b", **{
        "downlink-codec": "fp32", "codec-reference": "none", "codec-chunk": 7, "topk-fraction": 0.5})
    q8 = _rounds(tmp_path, "run-c", **Q8)
    # fp32 however the codec keys are set: every result identical, evaluation included.
    strip = lambda rounds: [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]  # noqa: E731
    assert strip(fp32) == strip(explicit)
    for ours, theirs in zip(q8, fp32):
        assert ours["eval_replies"] == NODES and not ours["eval_problems"], ours
        # An int8 per value and a float32 scale per 256 values: 0.254x the data, plus headers
        # and the config (0.255x measured).
        assert 0.25 < ours["eval_bytes_down"] / theirs["eval_bytes_down"] < 0.27
    assert q8[-1]["client_accuracy"] >= fp32[-1]["client_accuracy"] - 0.05
