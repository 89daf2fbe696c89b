"""Prediction from a run folder alone: the recorded preprocessing, no data set, checked input."""

from __future__ import annotations

import builtins
import json
import shutil

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image

from benchmarks.inprocess import simulate
from server_app.outputs import COMPLETED
from task import data as D
from task.predict import load_global_model, main as predict_main, predict

PIXELS = (10, 10)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A short FedAvg run on a local folder of uint8 images (train and test parquet files)."""
    import datasets
    import huggingface_hub.constants

    root = tmp_path_factory.mktemp("predict")
    folder = root / "tiny_images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    features = Features({"image": Image(), "label": ClassLabel(names=["cat", "dog", "owl"])})
    for split, size in (("train", 60), ("test", 24)):
        y = np.arange(size) % 3
        # class c is brighter in row band c, so the model has something to learn
        x = rng.integers(0, 80, (size, *PIXELS), dtype=np.uint8)
        for c in range(3):
            x[y == c, 3 * c : 3 * c + 3] += 150
        Dataset.from_dict({"image": list(x), "label": y.tolist()}, features=features).to_parquet(
            str(folder / f"{split}-00000-of-00001.parquet"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "cache")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        out = root / "run"
        simulate({"dataset": str(folder), "partitioner": "iid", "model": "logreg", "local-epochs": 2,
                  "num-server-rounds": 2, "fraction-evaluate": 0.0, "output-dir": str(out)},
                 num_nodes=2)
        D._federated_dataset.cache_clear()
    x, y = rng.integers(0, 80, (12, *PIXELS), dtype=np.uint8), np.arange(12) % 3
    for c in range(3):
        x[y == c, 3 * c : 3 * c + 3] += 150
    return {"run": out, "folder": folder, "x": x, "y": y}


@pytest.fixture
def no_data_set(monkeypatch):
    """Any attempt to read a data set fails the test."""
    def refuse(*args, **kwargs):
        pytest.fail("prediction read the data set")

    for name in ("data_spec", "server_test_set", "partition", "class_names", "_federated_dataset"):
        monkeypatch.setattr(D, name, refuse)
    real_import = builtins.__import__

    def guarded_import(name, *args, **kwargs):
        if name.split(".")[0] in ("datasets", "flwr_datasets"):
            pytest.fail(f"prediction imported {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded_import)


def test_run_folder_records_what_prediction_needs(image_run):
    run = image_run["run"]
    card = json.loads((run / "model.json").read_text())
    assert card["input-shape"] == [1, *PIXELS] and card["num-classes"] == 3
    assert card["class-names"] == ["cat", "dog", "owl"]
    assert card["architecture"] == {"model": "logreg", "mlp-hidden": "200,100", "activation": "relu"}
    assert card["preprocessing"]["uint8-divisor"] == 255.0
    low, high = card["preprocessing"]["input-range"]
    assert low == 0.0 and high == pytest.approx(229 / 255)  # the test split: 0..79, plus 150
    assert json.loads((run / "results.json").read_text())["status"] == COMPLETED


def test_uint8_inputs_are_scaled_as_in_training(image_run):
    model = load_global_model(image_run["run"])
    raw = image_run["x"]
    scaled = raw.astype(np.float32) / np.float32(255)
    from_raw, from_scaled = predict(model, raw), predict(model, scaled[:, None])
    np.testing.assert_array_equal(from_raw.probs, from_scaled.probs)
    assert (from_raw.probs.argmax(1) == image_run["y"]).mean() > 0.9
    # unscaled floats (what predict used to feed the model) give other answers
    unscaled = predict(model, raw.astype(np.float32))
    assert not np.allclose(unscaled.probs, from_raw.probs, atol=1e-3)


def test_a_copied_run_folder_predicts_without_the_data_set(image_run, tmp_path, capsys, no_data_set):
    copy = tmp_path / "elsewhere"
    shutil.copytree(image_run["run"], copy)
    inputs, preds = tmp_path / "inputs.npz", tmp_path / "preds.npz"
    np.savez(inputs, x=image_run["x"], y=image_run["y"])
    assert predict_main([str(copy), str(inputs), "--out", str(preds)]) == 0
    captured = capsys.readouterr()
    assert "12 inputs, point estimate" in captured.out and captured.err == ""
    with np.load(preds) as npz:
        assert npz["probs"].shape == (12, 3)
        names = np.array(["cat", "dog", "owl"])
        np.testing.assert_array_equal(npz["predicted_name"], names[npz["predicted"]])


def test_inputs_outside_the_training_range_are_named(image_run, tmp_path, capsys):
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=image_run["x"].astype(np.float32))  # raw pixel values, but not uint8
    assert predict_main([str(image_run["run"]), str(inputs)]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: inputs span ") and "training inputs spanned 0" in err


@pytest.mark.parametrize("samples", ["0", "-3"])
def test_samples_below_one_is_one_clear_line(image_run, tmp_path, capsys, samples):
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=image_run["x"])
    assert predict_main([str(image_run["run"]), str(inputs), "--samples", samples]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --samples must be at least 1, got {samples}\n"


def test_inputs_of_another_shape_are_one_clear_line(image_run, tmp_path, capsys):
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.zeros((4, 28, 28), np.uint8))
    assert predict_main([str(image_run["run"]), str(inputs)]) == 2
    assert capsys.readouterr().err == (
        "error: inputs of shape (4, 1, 28, 28) do not fit the model's input shape (1, 10, 10) "
        "(N x 100 values)\n")


def test_a_cnn1d_run_on_mnist1d_predicts_from_its_folder(tmp_path):
    """The card's architecture is checked against the run's own data set, not the default one
    (a cnn1d does not fit digits' images)."""
    out = tmp_path / "run"
    simulate({"dataset": "mnist1d", "mnist1d-samples": 400, "model": "cnn1d",
              "strategy": "bayes-admm", "optimizer": "ivon", "local-epochs": 1,
              "num-server-rounds": 1, "fraction-evaluate": 0.0, "eval-mc-samples": 2,
              "output-dir": str(out)}, num_nodes=2)
    model = load_global_model(out)
    assert model.cfg.model == "cnn1d" and model.spec.input_shape == (40,)
    assert model.precision is not None  # BayesADMM's posterior, for the BMA
    x = np.random.default_rng(0).standard_normal((5, 40)).astype(np.float32)
    prediction = predict(model, x, samples=3)
    assert prediction.probs.shape == (5, 10)
    np.testing.assert_allclose(prediction.probs.sum(axis=1), 1.0, rtol=1e-5)
