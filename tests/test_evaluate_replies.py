"""Evaluate replies are checked like train replies; results.json is strict JSON whatever comes in."""

from __future__ import annotations

import json
import math

import pytest
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from benchmarks.inprocess import InProcessGrid, _set_task_identity, default_run_config
from server_app.app import run
from server_app.outputs import strict_json_entry
from strategies import STRATEGIES
from task import records
from strategies.base import DROPPED_METRICS, weighted_metrics
from task.config import parse_run_config
from task.data import data_spec
from task.models import build_model
from task.params import model_to_record
from tests.conftest import reply


def _strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _eval_reply(node: int, metrics: dict) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    content = RecordDict({records.METRICS: MetricRecord(metrics)})
    answer = reply(instruction, content)
    return answer


@pytest.fixture
def strategy():
    cfg = parse_run_config({**default_run_config(), "model": "logreg"})
    return STRATEGIES["fedavg"](cfg, model_to_record(build_model(cfg, data_spec(cfg))))


BAD_COUNTS = [[1, 2], math.inf, 0, -3, 2.0, 10**400]


@pytest.mark.parametrize("count", BAD_COUNTS, ids=["list", "inf", "zero", "negative", "float", "huge"])
def test_an_evaluate_reply_with_a_bad_count_is_rejected_not_a_crash(strategy, count):
    # Before: weighted_metrics compared `[1, 2] > 0` (TypeError) or weighted by inf (nan).
    replies = [_eval_reply(1, {records.NUM_EXAMPLES: count, "accuracy": 0.0}),
               _eval_reply(2, {records.NUM_EXAMPLES: 10, "accuracy": 0.8})]
    out = strategy.aggregate_evaluate(1, replies)
    assert out[records.NUM_EXAMPLES] == 10 and out["accuracy"] == pytest.approx(0.8)
    log = strategy.last_evaluate
    assert (log.accepted, log.rejected, log.failed) == (1, 1, 0)
    assert "is not a positive integer" in log.reasons[0] or "is larger than" in log.reasons[0]


def test_an_evaluate_reply_without_metrics_is_rejected(strategy):
    out = strategy.aggregate_evaluate(1, [_eval_reply(1, {"accuracy": 0.5})])
    assert out is None
    assert strategy.last_evaluate.rejected == 1
    assert "missing MetricRecord" in strategy.last_evaluate.reasons[0]


def test_non_finite_client_metrics_are_dropped_with_a_reason_and_counted():
    problems: list[str] = []
    out = weighted_metrics(
        [
            MetricRecord({records.NUM_EXAMPLES: 10, "accuracy": math.nan, "nll": 1.0, "ece": 1e308,
                          "steps": 10**400}),
            MetricRecord({records.NUM_EXAMPLES: 30, "accuracy": 0.5, "nll": math.inf, "ece": 1e308,
                          "steps": 4}),
        ],
        problems,
    )
    # each key averages over the finite values only; 1e308 weighted 10:30 stays finite
    assert out["accuracy"] == 0.5 and out["nll"] == 1.0 and out["ece"] == pytest.approx(1e308)
    assert out["steps"] == 4.0
    assert out[DROPPED_METRICS] == 3
    assert any("'accuracy' = nan" in p for p in problems)
    assert any("'nll' = inf" in p for p in problems)


def test_server_metrics_that_are_not_finite_are_written_as_null_with_the_reason():
    entry = strict_json_entry({"round": 1, "accuracy": math.nan, "nll": math.inf,
                               "problems": ["x"], "nested": {"a": [1.0, -math.inf]}})
    text = json.dumps(entry, allow_nan=False)
    back = _strict_loads(text)
    assert back["accuracy"] is None and back["nll"] is None and back["nested"]["a"] == [1.0, None]
    assert set(back["not_finite"]) == {"accuracy", "nll", "nested.a[1]"}
    assert "nan is not a finite number" in back["not_finite"]["accuracy"]


class HostileEvaluateGrid(InProcessGrid):
    """Node 1 answers evaluate with `num-examples = [1, 2]`, node 2 with NaN and inf metrics."""

    def _deliver(self, message: Message) -> Message:
        answer = super()._deliver(message)
        node = message.metadata.dst_node_id
        if message.metadata.message_type != MessageType.EVALUATE or node > 2:
            return answer
        metrics = dict(answer.content.metric_records[records.METRICS])
        if node == 1:
            metrics[records.NUM_EXAMPLES] = [1, 2]
        else:
            metrics |= {"accuracy": math.nan, "nll": math.inf}
        return Message(RecordDict({records.METRICS: MetricRecord(metrics)}), reply_to=message)


def test_hostile_evaluate_replies_neither_crash_the_server_nor_break_results_json(tmp_path):
    _set_task_identity()
    config = {**default_run_config(), "model": "logreg", "num-server-rounds": 1, "local-epochs": 1,
              "output-dir": str(tmp_path / "run")}
    run(HostileEvaluateGrid(config, 3), parse_run_config(config))
    results = _strict_loads((tmp_path / "run" / "results.json").read_text())
    (entry,) = results["rounds"]
    assert results["status"] == "completed"
    assert (entry["eval_replies"], entry["eval_rejected"]) == (2, 1)
    assert "node 1: 'num-examples' = [1, 2] is not a positive integer" in entry["eval_problems"]
    assert entry["client_dropped_metrics"] == 2
    assert math.isfinite(entry["client_accuracy"]) and math.isfinite(entry["client_nll"])
