"""A federation writes the global model's uncertainty to results.json and plots it, leaves the
other numbers as they were, and `bayesfl predict` abstains from what it records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.inprocess import simulate
from task.cli import main as cli_main
from task.config import parse_run_config
from task.data import server_test_set

SHORT = {"num-server-rounds": 2, "local-epochs": 1, "fraction-evaluate": 0.0, "seed": 3}
BAYES = {"strategy": "bayes-admm", "optimizer": "ivon"}


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("uncertainty")
    # names of one length: each message carries its run's folder, counted in bytes_down
    folders = {
        "fedavg-every": {**SHORT, "uncertainty-eval-every": 1},
        "fedavg-final": SHORT,
        "bayes-every1": {**SHORT, **BAYES, "uncertainty-eval-every": 1},
    }
    for name, overrides in folders.items():
        simulate({**overrides, "output-dir": str(root / name)}, num_nodes=2)
    return {name: root / name for name in folders}


def test_every_evaluated_round_has_ood_selective_and_shift_numbers(runs):
    for name, predictives in (("fedavg-every", {"mean"}), ("bayes-every1", {"mean", "bma"})):
        results = _strict_json(runs[name] / "results.json")
        for entry in results["rounds"]:
            uncertainty = entry["uncertainty"]
            assert set(uncertainty) == predictives
            for predictive, metrics in uncertainty.items():
                assert set(metrics["ood_auroc_entropy"]) == {"noise", "inverted", "rotated"}
                aurocs = list(metrics["ood_auroc_entropy"].values())
                if predictive == "bma":
                    aurocs += list(metrics["ood_auroc_mi"].values())
                else:
                    assert "ood_auroc_mi" not in metrics
                assert all(0.0 <= a <= 1.0 for a in aurocs)
                # answering the less uncertain inputs only beats answering all of them
                assert metrics["selective_accuracy_80"] >= metrics["selective_accuracy_90"] - 0.02
                assert 0.0 <= metrics["aurc"] <= 1.0
                assert set(metrics["shift"]) == {"0.25", "0.5", "1"}
                assert len(metrics["reliability"]["share"]) == 15
        for png in ("uncertainty.png", "reliability.png"):
            assert (runs[name] / png).stat().st_size > 1000
        card = json.loads((runs[name] / "model.json").read_text())
        assert card["test-entropy"]["predictive"] == ("bma" if "bma" in predictives else "mean")
        assert len(card["test-entropy"]["quantiles"]) == 101


def test_by_default_only_the_last_round_is_evaluated_and_nothing_else_changes(runs):
    every = _strict_json(runs["fedavg-every"] / "results.json")["rounds"]
    last = _strict_json(runs["fedavg-final"] / "results.json")["rounds"]
    assert ["uncertainty" in r for r in last] == [False, True]
    assert last[-1]["uncertainty"] == every[-1]["uncertainty"]
    for a, b in zip(every, last, strict=True):
        drop = {"uncertainty", "seconds"}
        assert {k: v for k, v in a.items() if k not in drop} == {
            k: v for k, v in b.items() if k not in drop
        }
    every_model, final_model = (np.load(runs[n] / "model.npz") for n in ("fedavg-every", "fedavg-final"))
    with every_model, final_model:
        for key in every_model.files:
            if key != "__run_id__":
                np.testing.assert_array_equal(every_model[key], final_model[key])


def _test_inputs(run, tmp_path):
    cfg = parse_run_config(_strict_json(run / "results.json")["config"])
    test = server_test_set(cfg)
    path = tmp_path / "test.npz"
    np.savez(path, x=test.x, y=test.y)
    return path, cfg


def test_predict_abstains_at_the_coverage_the_run_recorded(runs, tmp_path, capsys):
    run = runs["bayes-every1"]
    inputs, cfg = _test_inputs(run, tmp_path)
    out = tmp_path / "preds.npz"
    # the draws the server's last evaluation made: its coverage holds exactly on its test set
    seed = str(cfg.seed + cfg.num_server_rounds)
    assert cli_main(["predict", str(run), str(inputs), "--coverage", "0.9", "--seed", seed,
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mean mutual information" in printed and "abstain on " in printed
    with np.load(out) as npz:
        abstain, entropy, mi = npz["abstain"], npz["entropy"], npz["mutual_information"]
    assert abstain.mean() == pytest.approx(0.1, abs=0.01)
    assert entropy[abstain].min() >= entropy[~abstain].max()
    assert (mi >= 0).all() and (mi <= entropy + 1e-12).all() and mi.max() > 0


def test_predict_abstains_above_an_entropy(runs, tmp_path, capsys):
    run = runs["fedavg-final"]
    inputs, _ = _test_inputs(run, tmp_path)
    out = tmp_path / "preds.npz"
    with np.load(inputs) as npz:
        np.savez(inputs, x=npz["x"][:50], y=npz["y"][:50])
    assert cli_main(["predict", str(run), str(inputs), "--out", str(out)]) == 0
    with np.load(out) as npz:
        assert not npz["abstain"].any()  # no threshold: every input answered
        threshold = float(np.median(npz["entropy"]))
    assert cli_main(["predict", str(run), str(inputs), "--abstain-entropy", str(threshold),
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    with np.load(out) as npz:
        np.testing.assert_array_equal(npz["abstain"], npz["entropy"] > threshold)
        np.testing.assert_array_equal(npz["mutual_information"], np.zeros(50))  # a point estimate
        abstained = int(npz["abstain"].sum())
    assert 0 < abstained < 50
    assert f"abstain on {abstained} of 50 inputs" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--coverage", "0"], "--coverage must be in (0, 1], got 0.0"),
        (["--coverage", "1.5"], "--coverage must be in (0, 1], got 1.5"),
        (["--abstain-entropy", "-1"], "--abstain-entropy must be a finite entropy >= 0, got -1.0"),
    ],
)
def test_bad_abstain_options_are_one_line(runs, tmp_path, capsys, args, message):
    inputs, _ = _test_inputs(runs["fedavg-final"], tmp_path)
    assert cli_main(["predict", str(runs["fedavg-final"]), str(inputs), *args]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_coverage_needs_the_recorded_quantiles(runs, tmp_path, capsys):
    import shutil

    copy = tmp_path / "old-run"
    shutil.copytree(runs["fedavg-final"], copy)
    card = json.loads((copy / "model.json").read_text())
    del card["test-entropy"]  # a run folder from before the uncertainty evaluation
    (copy / "model.json").write_text(json.dumps(card))
    inputs, _ = _test_inputs(copy, tmp_path)
    assert cli_main(["predict", str(copy), str(inputs), "--coverage", "0.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --coverage needs the test set's entropy quantiles")
    assert "\n" not in err
