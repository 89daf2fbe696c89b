"""Smoke tests of the benchmark scripts' --quick modes (real in-process federations)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_quick(script: str, out: Path, *args: str, stem: str = "") -> tuple[dict, str]:
    """Run benchmarks/<script>.py --quick into `out`; its JSON results and markdown table
    (`<stem>.json` and `<stem>.md`, the stem being the script's name unless given)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}.py", "--quick", "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,  # a hang guard only
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stem = stem or script
    return json.loads((out / f"{stem}.json").read_text()), (out / f"{stem}.md").read_text()


def test_heterogeneity_quick_writes_every_method_and_setting(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.heterogeneity import METHODS, METRICS, QUICK

    out = tmp_path / "results"
    results, table = _run_quick("heterogeneity", out)
    assert set(results["settings"]) == set(QUICK["settings"])
    for setting, entry in results["settings"].items():
        assert f"### {setting}" in table
        assert (out / entry["plot"]).stat().st_size > 0
        assert set(entry["summary"]) == set(METHODS)
        for method, summary in entry["summary"].items():
            assert f"| {method} |" in table
            # BayesADMM alone keeps a posterior, so it alone reports BMA.
            assert set(summary) == ({"mean", "bma"} if method == "bayes-admm" else {"mean"})
            for by_round in summary.values():
                to_target = by_round.pop("to_target")
                assert len(to_target) == len(QUICK["seeds"])
                assert all(r is None or 1 <= r <= QUICK["rounds"] for r in to_target)
                assert by_round, (setting, method)
                for stats in by_round.values():
                    for metric in METRICS:
                        assert math.isfinite(stats[metric]["mean"]), (setting, method, metric)
                        assert math.isfinite(stats[metric]["std"]), (setting, method, metric)
            assert len(entry["runs"][method]) == len(QUICK["seeds"])
            assert len(entry["runs"][method][0]["rounds"]) == QUICK["rounds"]
        assert "| bayes-admm (BMA) |" in table


def test_defaults_quick_writes_every_combination(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.defaults import COMBINATIONS, QUICK

    results, table = _run_quick("defaults", tmp_path / "results")
    assert set(results["summary"]) == set(COMBINATIONS)
    assert len(results["runs"]) == len(COMBINATIONS) * len(QUICK["seeds"])
    for combination, summary in results["summary"].items():
        assert f"| {combination} |" in table
        assert math.isfinite(summary["nll"]["mean"]), combination
        assert 0 < summary["accuracy"][str(QUICK["rounds"])]["mean"] <= 1, combination
        # BayesADMM alone keeps a posterior, so it alone reports BMA.
        # BMA only where there is a fitted posterior: BayesADMM's diagonal one, not the isotropic.
        assert ("bma_nll" in summary) == (combination == "bayes-admm+ivon"), combination
    for run in results["runs"]:
        assert [r["round"] for r in run["rounds"]] == list(range(1, QUICK["rounds"] + 1))


def test_tuning_quick_scores_every_candidate_and_writes_valid_presets(tmp_path):
    import tomllib

    sys.path.insert(0, str(ROOT))
    from benchmarks.heterogeneity import METHODS
    from benchmarks.tune import GRID_SIZE, GRIDS, SEED, SETTING, VAL_FRACTION
    from task.config import parse_run_config

    out = tmp_path / "results"
    methods = ["fedavg", "admm"]
    results, table = _run_quick("tune", out, "--methods", *methods, stem="tuning")
    assert (results["setting"], results["seed"], results["val_fraction"]) == (
        SETTING, SEED, VAL_FRACTION)
    assert set(results["methods"]) == set(methods)
    for method, rows in results["methods"].items():
        assert sorted(map(str, (r["point"] for r in rows))) == sorted(map(str, GRIDS[method]))
        assert all(0 <= r["val_accuracy"] <= 1 for r in rows)
        best = max(r["val_accuracy"] for r in rows)
        assert rows[0]["val_accuracy"] == best  # the chosen one comes first
        preset = tomllib.loads((out / f"{method}-mnist1d.toml").read_text())
        assert {k: preset[k] for k in rows[0]["point"]} == rows[0]["point"]
        cfg = parse_run_config(preset)
        assert (cfg.dataset, cfg.model, cfg.server_val_fraction) == ("mnist1d", "cnn1d", 0.0)
        assert f"| {method} |" in table
    assert set(GRIDS) == set(METHODS)
    assert all(len(grid) == GRID_SIZE for grid in GRIDS.values())  # the same budget for each
