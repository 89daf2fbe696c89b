"""Smoke tests of the benchmark scripts' --quick modes (real in-process federations)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from task.metrics import TEMPERATURES

ROOT = Path(__file__).resolve().parents[1]
# The attack benchmark's --quick run (3 rounds): most accuracy points an attack may cost under
# the recommended setting against the honest run with defaults.
QUICK_MAX_COST = 10.0


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

    # --from-json joins files: the runs split by method into two files render as the whole.
    halves = []
    for i, part in enumerate((list(METHODS)[:2], list(METHODS)[2:])):
        half = json.loads(json.dumps(results))
        for entry in half["settings"].values():
            entry["runs"] = {m: rs for m, rs in entry["runs"].items() if m in part}
        half["command"] = f"part {i}"
        halves.append(tmp_path / f"half{i}.json")
        halves[-1].write_text(json.dumps(half))
    joined = tmp_path / "joined"
    subprocess.run([sys.executable, "benchmarks/heterogeneity.py", "--from-json", *map(str, halves),
                    "--out", str(joined)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    rejoined = json.loads((joined / "heterogeneity.json").read_text())
    assert rejoined["command"] == "part 0` and `part 1"
    assert rejoined["wall_seconds"] == 2 * results["wall_seconds"]
    for setting, entry in results["settings"].items():
        assert rejoined["settings"][setting]["runs"] == entry["runs"]
        assert set(rejoined["settings"][setting]["summary"]) == set(METHODS)


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


def test_uncertainty_quick_reports_mean_and_bma(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.uncertainty import METHODS, QUICK

    results, table = _run_quick("uncertainty", tmp_path / "results")
    assert set(results["summary"]) == set(METHODS)
    assert len(results["runs"]) == len(METHODS) * len(QUICK["seeds"])
    assert set(results["summary"]["fedavg"]) == {"mean"}
    assert set(results["summary"]["bayes-admm"]) == {"mean", "bma"}
    bma = results["summary"]["bayes-admm"]["bma"]
    for ood in ("noise", "inverted", "rotated"):
        assert 0.0 <= bma[f"auroc_mi_{ood}"]["mean"] <= 1.0
    assert "| fedavg |" in table and "| bayes-admm (BMA) |" in table
    # the posterior's precision times 1 is the server's own BMA: the same draws, the same numbers
    assert results["scaled_posterior"]["precision x1"]["bma"] == bma
    assert set(results["scaled_posterior"]) == {f"precision x{s:g}" for s in QUICK["scales"]}


def test_uncertainty_quick_on_a_heterogeneity_setting_runs_its_tuned_presets(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.heterogeneity import method_config

    results, table = _run_quick(
        "uncertainty", tmp_path / "results", "--setting", "mnist1d-patho2", "--rounds", "2",
        "--scales", "1", "0.001",
    )
    assert results["setting"] == "mnist1d-patho2" and results["num_nodes"] == 10
    for run in results["runs"]:
        assert run["round"] == 2
        preset = method_config(run["method"], "mnist1d")
        preset.pop("eval-mc-samples", None)  # --quick draws fewer weights for the BMA
        assert {k: run["overrides"][k] for k in preset} == preset  # the tuned preset, unchanged
        assert run["overrides"]["classes-per-client"] == 2
    assert set(results["scaled_posterior"]) == {"precision x1", "precision x0.001"}
    bma = results["summary"]["bayes-admm"]["bma"]
    assert results["scaled_posterior"]["precision x1"]["bma"] == bma
    assert "AUROC MI shuffled" in table  # MNIST-1D's OOD sets


def test_personalization_quick_reports_every_method_global_and_personal(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.personalization import METHODS, QUICK, ROWS

    out = tmp_path / "results"
    results, table = _run_quick("personalization", out)
    assert set(results["settings"]) == set(QUICK["settings"])
    for setting, entry in results["settings"].items():
        assert (out / entry["plot"]).stat().st_size > 0
        assert {run["method"] for run in entry["runs"]} == set(METHODS)
        assert set(entry["summary"]) == {label for label, _, _ in ROWS}
        for label, row in entry["summary"].items():
            assert f"| {label} |" in table
            for metric, stats in row.items():
                for stat in ("node_mean", "weighted", "worst10"):
                    assert math.isfinite(stats[stat]["mean"]), (setting, label, metric, stat)
        for run in entry["runs"]:
            if run["method"] != "local-only":  # every federation scored all its nodes
                assert run["summary"]["nodes_with_personal_model"] == QUICK["nodes"]


def test_attacks_quick_no_attack_crashes_and_the_recommended_setting_holds(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.attacks import DEFAULTS, HONEST, RECOMMENDED, attacks_for

    results, table = _run_quick("attacks", tmp_path / "results")
    summary = results["summary"]
    assert set(summary) == {"fedavg", "bayes-admm"}
    for strategy, by_defence in summary.items():
        assert f"### {strategy}" in table
        assert set(by_defence) == {DEFAULTS, RECOMMENDED}
        for defence, by_attack in by_defence.items():
            assert set(by_attack) == set(attacks_for(strategy)), (strategy, defence)
            for attack, cell in by_attack.items():
                # With defaults too: an attack may wreck the model but never crashes the run.
                assert cell["completed"] and not cell["errors"], (strategy, defence, attack)
                assert math.isfinite(cell["accuracy"]["mean"]), (strategy, defence, attack)
        assert by_defence[DEFAULTS][HONEST]["accuracy"]["mean"] > 0.5, strategy
    # The recommended setting holds every attack on FedAvg against the honest run with defaults.
    fedavg = summary["fedavg"]
    for attack, cell in fedavg[RECOMMENDED].items():
        assert cell["cost_points"] <= QUICK_MAX_COST, (attack, cell)
    # So does BayesADMM's (multi-krum), attacks only: in 3 rounds its honest run is behind,
    # having left out an honest node (measured 68.1 against 81.7; docs/ALGORITHMS.md).
    for attack, cell in summary["bayes-admm"][RECOMMENDED].items():
        if attack != HONEST:
            assert cell["cost_points"] <= QUICK_MAX_COST, (attack, cell)
    # BayesADMM's hijacks are held by every setting, the defaults included (out-of-bounds
    # coordinates are left out of the average), against the honest run with the same setting
    # (docs/BENCHMARKS.md, "Attacks").
    for defence, by_attack in summary["bayes-admm"].items():
        honest = by_attack[HONEST]["accuracy"]["mean"]
        for attack in ("precision-hijack", "mean-hijack"):
            cost = 100 * (honest - by_attack[attack]["accuracy"]["mean"])
            assert cost <= QUICK_MAX_COST, (defence, attack, by_attack[attack])
    # The attacks bite undefended: the inflated zero model takes FedAvg over (one class for all).
    assert fedavg[DEFAULTS]["weight-inflation"]["accuracy"]["mean"] < 0.2
    for run in results["runs"]:
        assert [r["round"] for r in run["rounds"]] == list(range(1, results["rounds"] + 1))


def test_communication_quick_compares_every_variant_with_its_fp32(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.communication import QUICK, SETTINGS, TARGETS

    out = tmp_path / "results"
    results, table = _run_quick("communication", out)
    assert set(results["settings"]) == set(SETTINGS)
    for setting, entry in results["settings"].items():
        assert (out / entry["plot"]).stat().st_size > 0
        assert set(entry["comparison"]) == set(QUICK["variants"])
        for variant, row in entry["comparison"].items():
            assert f"| {variant} |" in table
            assert 0 < row["accuracy"] <= 1 and row["mb"] > 0, variant
            assert [r["round"] for r in entry["runs"][variant][0]["rounds"]] == [1, 2]
            if variant.endswith("/fp32"):
                assert row["bytes_ratio"] == 1 and row["points_lost"] == 0, variant
            else:  # q8 sends about a quarter of fp32's bytes up, every round
                assert row["uplink_ratio"] < 0.3, (variant, row)
            assert ("met" in row) == (variant in TARGETS), variant
        # BayesADMM sends a mean and a precision: twice FedAvg's bytes in fp32.
        assert entry["comparison"]["bayes-admm/fp32"]["vs_fedavg_fp32"] > 1.9


def test_tuning_quick_scores_every_candidate_and_writes_valid_presets(tmp_path):
    import tomllib

    sys.path.insert(0, str(ROOT))
    from benchmarks.heterogeneity import METHODS
    from benchmarks.tune import GRID_SIZE, GRIDS, SEED, TUNING_SETTINGS, VAL_FRACTION
    from task.config import parse_run_config

    out = tmp_path / "results"
    methods = ["fedavg", "admm"]
    results, table = _run_quick("tune", out, "--methods", *methods, stem="tuning")
    assert (results["settings"], results["seed"], results["val_fraction"]) == (
        list(TUNING_SETTINGS), SEED, VAL_FRACTION)
    assert set(results["methods"]) == set(methods)
    for method, rows in results["methods"].items():
        assert sorted(map(str, (r["point"] for r in rows))) == sorted(map(str, GRIDS[method]))
        for r in rows:  # scored on every tuning setting, by their mean
            per_setting = [r["per_setting"][s]["val_accuracy"] for s in TUNING_SETTINGS]
            assert all(0 <= a <= 1 for a in per_setting)
            assert r["val_accuracy"] == pytest.approx(sum(per_setting) / len(per_setting))
        best = max(r["val_accuracy"] for r in rows)
        assert rows[0]["val_accuracy"] == best  # the chosen one comes first
        preset = tomllib.loads((out / f"{method}-mnist1d.toml").read_text())
        assert {k: preset[k] for k in rows[0]["point"]} == rows[0]["point"]
        cfg = parse_run_config(preset)
        assert (cfg.dataset, cfg.model, cfg.server_val_fraction) == ("mnist1d", "cnn1d", 0.0)
        assert f"| {method} |" in table
    assert set(GRIDS) == set(METHODS)
    assert all(len(grid) == GRID_SIZE for grid in GRIDS.values())  # the same budget for each


def test_ivon_regimes_quick_trains_every_optimizer_on_a_validation_split(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.ivon_regimes import OPTIMIZERS, QUICK

    results, table = _run_quick("ivon_regimes", tmp_path / "results", "--jobs", "1",
                                stem="ivon-regimes")
    assert set(results["summary"]) == set(OPTIMIZERS)
    assert results["epochs"] == list(range(1, QUICK["epochs"] + 1))
    for run in results["runs"]:
        assert [p["epoch"] for p in run["curve"]] == results["epochs"]
        # The server's test set (20%) is left out, 10% of the rest is held out for validation.
        held_out = run["validation_examples"]
        assert (run["train_examples"], held_out) == (720, 80)
        assert all(abs(held_out * p["accuracy"] - round(held_out * p["accuracy"])) < 1e-6
                   for p in run["curve"])
        assert all(p["nll"] > 0 for p in run["curve"])
    for name in OPTIMIZERS:
        assert f"| {name} |" in table


def test_bma_gap_quick_scores_the_runs_own_test_split(tmp_path):
    results, table = _run_quick(
        "bma_gap", tmp_path / "results", "--seeds", "1", "--variant", "mc-samples=1", stem="bma-gap"
    )
    (run,) = results["runs"]
    assert run["seed"] == 1 and run["keys"]["mc-samples"] == 1
    # the seed's own test split: the server scored the same network at the same temperature
    assert run["mean_nll"] == pytest.approx(run["server_nll"], rel=1e-4)
    assert run["temperature"] in TEMPERATURES and run["best_temperature"] in TEMPERATURES
    # the test split's best temperature is at least as good as the fitted one and as none
    assert run["mean_nll_best"] <= min(run["mean_nll"], run["mean_nll_t1"])
    for key in ("bma_nll_t1", "bma_nll", "bma_nll_best", "bma_nll_x2", "bma_nll_x4", "gap_standard_error"):
        assert math.isfinite(run[key])
    assert "| 1 |" in table


def test_personalization_refuses_a_split_it_cannot_make_before_running_anything(tmp_path):
    # Dirichlet(0.1) cannot give 100 nodes two rows each of digits' 1,437: say so up front.
    done = subprocess.run(
        [sys.executable, "benchmarks/personalization.py", "--quick", "--nodes", "100",
         "--settings", "digits-dir0.1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    assert "digits-dir0.1 seed 0" in done.stderr and "over 100 nodes" in done.stderr
    assert not any(tmp_path.iterdir())
