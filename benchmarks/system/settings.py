"""What a full and a quick run measure, and the run config every round benchmark starts from."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("step", "aggregation", "rounds", "simulation", "deployment")

FULL: dict[str, Any] = {
    "step_cases": [
        ("mlp 784-200-100-10", "mlp", (1, 28, 28), 64),
        ("mlp 784-200-100-10", "mlp", (1, 28, 28), 256),
        ("mlp 64-200-100-10 (digits)", "mlp", (1, 8, 8), 32),
        ("cnn 1x28x28", "cnn", (1, 28, 28), 64),
        ("cnn 3x32x32", "cnn", (3, 32, 32), 64),
    ],
    "step_blocks": 9,
    "step_block_seconds": 0.4,
    "agg_strategies": ("fedavg", "bayes-admm"),
    "agg_clients": (10, 100, 1000),
    "agg_params": (10_000, 1_000_000),
    "agg_repeats": 5,
    "agg_memory_budget_gb": 5.0,
    # (label, run-config overrides, strategies): the MLP of the e2e tests, and a CNN whose local
    # compute per round is some 50 times larger, to show which costs are fixed per message.
    "round_workloads": [
        ("digits mlp", {"model": "mlp"}, ("fedavg", "fedpa", "bayes-admm")),
        ("digits cnn", {"model": "cnn"}, ("fedavg", "bayes-admm")),
    ],
    "round_nodes": 10,
    "round_rounds": 4,
    "round_repeats": 2,
}
QUICK: dict[str, Any] = {
    "step_cases": [
        ("mlp 784-200-100-10", "mlp", (1, 28, 28), 64),
        ("mlp 64-200-100-10 (digits)", "mlp", (1, 8, 8), 32),
    ],
    "step_blocks": 3,
    "step_block_seconds": 0.1,
    "agg_strategies": ("fedavg", "bayes-admm"),
    "agg_clients": (10, 100),
    "agg_params": (10_000,),
    "agg_repeats": 2,
    "agg_memory_budget_gb": 0.5,
    "round_workloads": [("digits mlp", {"model": "mlp"}, ("fedavg", "fedpa", "bayes-admm"))],
    "round_nodes": 4,
    "round_rounds": 2,
    "round_repeats": 1,
}

ROUND_BASE = {"dataset": "digits", "partitioner": "dirichlet", "dirichlet-alpha": 0.5, "seed": 0}


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))
