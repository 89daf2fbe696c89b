"""The run's predictive temperature (`predictive-temperature`): fitted each round on the nodes'
held-out splits, applied to every prediction (server metrics, BMA, model.json, `bayesfl
predict`), kept by checkpoints, and never touching training."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest

from benchmarks.inprocess import simulate
from server_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from task.config import ConfigError, parse_run_config
from task.data import server_test_set
from task.metrics import TEMPERATURES, nll
from task.predict import load_global_model, predict

DATA = {"dataset": "digits", "partitioner": "dirichlet", "dirichlet-alpha": 0.1, "seed": 0}
FAST = {"model": "mlp"}  # the temperature does not care which network; an MLP is quick


def _client_scores(entry: dict) -> dict[float, float]:
    return {t: entry[f"client_nll_t{t:g}"] for t in TEMPERATURES}


@pytest.fixture(scope="module")
def fedavg_runs(tmp_path_factory):
    """The same FedAvg federation twice: temperature fitted ("auto") and fixed at 1."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    keys = {"strategy": "fedavg", "optimizer": "sgd", **DATA, **FAST, "num-server-rounds": 6}
    auto = tmp_path_factory.mktemp("auto")
    raw = tmp_path_factory.mktemp("raw")
    return (
        simulate({**keys, "output-dir": str(auto)}, 4), auto,
        simulate({**keys, "predictive-temperature": 1.0, "output-dir": str(raw)}, 4),
    )


def test_each_round_takes_the_temperature_with_the_lowest_client_nll(fedavg_runs):
    rounds = fedavg_runs[0].results["rounds"]
    for entry in rounds:
        scores = _client_scores(entry)
        assert entry["temperature"] == min(scores, key=scores.get), entry["round"]
    # Early global models of a label-skewed federation are underconfident.
    assert rounds[0]["temperature"] < 1.0


def test_temperature_changes_the_predictions_not_the_training(fedavg_runs):
    auto, _, raw = fedavg_runs
    fitted, fixed = auto.results["rounds"], raw.results["rounds"]
    for a, r in zip(fitted, fixed, strict=True):
        assert a["accuracy"] == r["accuracy"] and a["train_loss"] == r["train_loss"]
        assert r["temperature"] == 1.0 and "client_nll_t1" not in r
    # Fitted on the nodes' data, it lowers the server's test NLL over the run.
    assert np.mean([a["nll"] for a in fitted]) < np.mean([r["nll"] for r in fixed])


def test_predict_applies_the_runs_temperature(fedavg_runs):
    outputs, folder, _ = fedavg_runs
    model = load_global_model(folder)
    last = outputs.results["rounds"][-1]
    assert model.temperature == last["temperature"] != 1.0
    test = server_test_set(parse_run_config({**DATA}))
    probs = predict(model, test.x).probs
    assert nll(probs, test.y) == pytest.approx(last["nll"], rel=1e-9)


def test_a_posterior_run_tempers_its_bma_and_uncertainty(tmp_path):
    logging.getLogger("flwr").setLevel(logging.WARNING)
    keys = {"strategy": "bayes-admm", "optimizer": "ivon", **DATA, **FAST, "num-server-rounds": 3,
            "eval-mc-samples": 4, "output-dir": str(tmp_path)}
    rounds = simulate(keys, 4).results["rounds"]
    last = rounds[-1]
    assert last["temperature"] in TEMPERATURES and "bma_nll" in last
    assert "uncertainty" in last
    model = load_global_model(tmp_path)
    assert model.precision is not None and model.temperature == last["temperature"]
    test = server_test_set(parse_run_config({**DATA}))
    # The server's BMA draws use the seed cfg.seed + round; predict's the seed it is given.
    probs = predict(model, test.x, samples=4, seed=keys["seed"] + len(rounds)).probs
    assert nll(probs, test.y) == pytest.approx(last["bma_nll"], rel=1e-9)


def test_checkpoints_keep_the_temperature(tmp_path):
    checkpoint = Checkpoint(3, "key", {}, {"w": np.zeros(2)}, {}, {}, temperature=0.7071)
    save_checkpoint(tmp_path, checkpoint)
    assert load_checkpoint(tmp_path).temperature == 0.7071
    save_checkpoint(tmp_path, dataclasses.replace(checkpoint, temperature=-1.0))
    with pytest.raises(ConfigError, match="'temperature' = -1.0 is not a positive number"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("value", [0, -1.0, "warm"])
def test_a_bad_temperature_is_refused(value):
    with pytest.raises(ConfigError, match="predictive-temperature"):
        parse_run_config({"predictive-temperature": value})


@pytest.mark.parametrize("value", [0, -0.5, "hot", True, None])
def test_a_model_card_with_a_bad_temperature_is_one_clear_line(fedavg_runs, tmp_path, value):
    folder = tmp_path / "run"
    shutil.copytree(fedavg_runs[1], folder)
    card = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps(card | {"temperature": value}))
    with pytest.raises(ConfigError, match="temperature .* is not a positive number"):
        load_global_model(folder)
