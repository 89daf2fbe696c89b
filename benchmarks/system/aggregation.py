"""`aggregate_train` of a real strategy on K replies of P parameters: time and working memory."""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from benchmarks.inprocess import NodeListGrid
from benchmarks.inprocess import _set_task_identity as set_task_identity
from benchmarks.system.settings import median
from strategies import STRATEGIES
from task import records
from task.config import parse_run_config
from task.params import numpy_to_record


def _aggregation_case(strategy_name: str, num_clients: int, num_params: int, distinct: int = 4):
    """A fresh strategy after configure_train for K nodes, and K valid replies to it."""
    cfg = parse_run_config({
        "strategy": strategy_name, "optimizer": "ivon" if strategy_name == "bayes-admm" else "sgd",
        "min-train-nodes": 1, "fraction-train": 1.0,
    })
    # Two tensors, as a layer's weight and bias.
    shapes = {"weight": (num_params - 10,), "bias": (10,)}
    rng = np.random.default_rng(0)
    initial = numpy_to_record({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()})
    strategy = STRATEGIES[strategy_name](cfg, initial)
    grid = NodeListGrid(range(1, num_clients + 1))
    messages = list(strategy.configure_train(1, initial, ConfigRecord({records.STATE_KEY: "b"}), grid))
    contents = []
    for index in range(min(distinct, num_clients)):
        content = RecordDict({
            records.ARRAYS: numpy_to_record(
                {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
            ),
            records.METRICS: MetricRecord({records.NUM_EXAMPLES: 100 + index}),
        })
        if strategy_name == "bayes-admm":
            content[records.PRECISION] = numpy_to_record(
                {k: (1.0 + rng.random(size=s)).astype(np.float32) for k, s in shapes.items()}
            )
        contents.append(content)
    replies = [Message(contents[i % len(contents)], reply_to=m) for i, m in enumerate(messages)]
    return strategy, replies


def _working_memory(call: Callable[[], Any]) -> tuple[float, Any]:
    """Peak bytes allocated during `call()` beyond what existed before it (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return float(peak), result


def bench_aggregation(settings: dict[str, Any], log: Callable[[str], None]) -> list[dict[str, Any]]:
    set_task_identity()
    rows = []
    budget = settings["agg_memory_budget_gb"] * 1e9
    for strategy_name in settings["agg_strategies"]:
        for num_params in settings["agg_params"]:
            per_client: float | None = None  # working bytes per reply, from the last K measured
            for num_clients in settings["agg_clients"]:
                row: dict[str, Any] = {"strategy": strategy_name, "clients": num_clients,
                                       "params": num_params}
                if per_client is not None and per_client * num_clients > budget:
                    row |= {"status": f"skipped: needs ~{per_client * num_clients / 1e9:.0f} GB "
                                      f"of working memory (budget {budget / 1e9:.1f} GB)",
                            "predicted_working_mb": per_client * num_clients / 1e6}
                    rows.append(row)
                    log(f"aggregation {strategy_name} K={num_clients} P={num_params}: {row['status']}")
                    continue
                seconds: list[float] = []
                while len(seconds) < settings["agg_repeats"] and sum(seconds) < 20.0:
                    strategy, replies = _aggregation_case(strategy_name, num_clients, num_params)
                    gc.collect()
                    started = time.perf_counter()
                    arrays, _ = strategy.aggregate_train(1, replies)
                    seconds.append(time.perf_counter() - started)
                    assert arrays is not None, strategy.last_round
                    del strategy, replies, arrays
                strategy, replies = _aggregation_case(strategy_name, num_clients, num_params)
                input_bytes = sum(
                    int(r.count_bytes()) for content in {id(m.content): m.content for m in replies}.values()
                    for r in content.array_records.values()
                )
                peak, _ = _working_memory(lambda: strategy.aggregate_train(1, replies))
                del strategy, replies
                per_client = peak / num_clients
                row |= {"status": "ok", "seconds": median(seconds),
                        "working_mb": peak / 1e6, "working_mb_per_client": per_client / 1e6,
                        "working_per_model_size": peak / (4 * num_params),
                        "distinct_reply_mb": input_bytes / 1e6}
                rows.append(row)
                log(f"aggregation {strategy_name} K={num_clients} P={num_params}: "
                    f"{row['seconds'] * 1e3:.1f} ms, working memory {row['working_mb']:.1f} MB "
                    f"({row['working_per_model_size']:.1f} x the float32 model)")
    return rows
