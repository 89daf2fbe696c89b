"""Smoke test of `python -m benchmarks.system --quick`: it runs, and every table it writes is
complete."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.system.real_runs import flower_floor_rows
from benchmarks.system.settings import QUICK
from benchmarks.system.step import STEP_OPTIMIZERS, STEP_PARTS

ROOT = Path(__file__).resolve().parents[1]
QUICK_TABLES = {"step_time", "aggregation", "round_split", "round_summary", "bytes"}


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_quick_mode_writes_every_table_with_finite_numbers(tmp_path):
    out = tmp_path / "system"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.system", "--quick", "--threads", "1", "--out", str(out)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    tables = json.loads((out / "system.json").read_text())
    assert QUICK_TABLES <= tables.keys()
    assert tables["machine"]["torch_threads"] == 1
    for name in QUICK_TABLES:
        assert tables[name], name
        for row in tables[name]:
            assert _numbers(row), (name, row)
            assert all(math.isfinite(v) for v in _numbers(row).values()), (name, row)

    steps = tables["step_time"]
    timed = {*STEP_OPTIMIZERS, *STEP_PARTS, "ivon-floor"}
    assert len(steps) == len(QUICK["step_cases"]) * len(timed)
    assert {r["optimizer"] for r in steps} == timed
    assert all(r["step_ms"] > 0 for r in steps)
    assert all(r["vs_adam"] == 1.0 for r in steps if r["optimizer"] == "adam")
    for case in {r["model"] + str(r["batch"]) for r in steps}:  # the floor is the sum of its parts
        ms = {r["optimizer"]: r["step_ms"] for r in steps if r["model"] + str(r["batch"]) == case}
        assert ms["forward-backward"] < ms["ivon-floor"] and ms["noise-draw"] < ms["ivon-floor"]

    aggregation = tables["aggregation"]
    assert {(r["strategy"], r["clients"], r["params"]) for r in aggregation} == {
        (s, k, p) for s in QUICK["agg_strategies"] for k in QUICK["agg_clients"] for p in QUICK["agg_params"]
    }
    assert all(r["working_mb"] > 0 for r in aggregation if r["status"] == "ok")

    # Every round's time splits into local training and the rest; BayesADMM moves 2x FedAvg's bytes.
    for row in tables["round_split"]:
        assert 0 < row["local_training_seconds"] < row["round_seconds"]
    ratios = {r["strategy"]: r["vs_fedavg"] for r in tables["bytes"]}
    assert math.isclose(ratios["bayes-admm"], 2.0, rel_tol=0.01)
    assert "### step_time" in (out / "system.md").read_text()


@pytest.mark.e2e
def test_flower_floor_rows_come_from_a_real_flwr_run_of_the_no_op_app(tmp_path):
    rows = flower_floor_rows("digits mlp", {"model": "mlp"}, 3, 2, 1, tmp_path, 0, lambda _: None)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["round_seconds"] > 0 and r["clients"] == 3 for r in rows)
    assert rows[0]["params"] == 64 * 200 + 200 + 200 * 100 + 100 + 100 * 10 + 10  # the digits MLP
