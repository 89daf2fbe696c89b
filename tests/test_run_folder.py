"""A run folder belongs to one run: output-dir is not reused by accident, every artifact names its
run, and prediction refuses a folder whose files do not fit together, in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from benchmarks.inprocess import InProcessGrid, _set_task_identity, default_run_config
from server_app.app import run
from server_app.checkpoint import load_checkpoint
from task.config import ConfigError, parse_run_config
from task.predict import RUN_ID_KEY, main as predict_main


def _config(out, **overrides):
    return {**default_run_config(), "model": "logreg", "num-server-rounds": 1, "local-epochs": 1,
            "fraction-evaluate": 0.0, "output-dir": str(out), **overrides}


def _run(config):
    _set_task_identity()
    return run(InProcessGrid(config, 2), parse_run_config(config))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    _run(_config(out))
    return out


def _run_ids(folder):
    ids = {"results.json": json.loads((folder / "results.json").read_text())["run_id"],
           "model.json": json.loads((folder / "model.json").read_text())["run-id"],
           "checkpoint.npz": load_checkpoint(folder).run_id}
    for name in ("model.npz", "posterior.npz"):
        if (folder / name).exists():
            with np.load(folder / name) as npz:
                ids[name] = str(npz[RUN_ID_KEY])
    return ids


def test_every_artifact_carries_the_run_id(finished):
    ids = _run_ids(finished)
    assert len(set(ids.values())) == 1 and len(ids["model.json"]) == 32, ids


def test_a_folder_that_holds_files_is_refused_before_anything_is_written(finished, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(finished, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError) as info:
        _run(_config(out))
    message = str(info.value)
    assert message.startswith(f"output-dir: {out} already holds 7 file(s) (checkpoint.npz, ")
    assert message.endswith("use an empty or new folder, resume-from it, or set overwrite = true")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_folder_with_only_the_launchers_run_config_is_empty(tmp_path):
    out = tmp_path / "fresh"
    out.mkdir()
    (out / "run-config.toml").write_text("seed = 0\n")  # what `bayesfl run` writes first
    _run(_config(out))
    assert json.loads((out / "results.json").read_text())["status"] == "completed"


def test_overwrite_deletes_the_earlier_runs_artifacts_first(finished, tmp_path):
    out = tmp_path / "over"
    shutil.copytree(finished, out)
    old_id = _run_ids(out)["model.json"]
    # a stale posterior from an earlier BayesADMM run: a FedAvg run writes none of its own
    np.savez(out / "posterior.npz", **{RUN_ID_KEY: np.array(old_id)})
    (out / "notes.txt").write_text("mine")
    _run(_config(out, overwrite=True))
    ids = _run_ids(out)
    assert "posterior.npz" not in ids and old_id not in ids.values() and len(set(ids.values())) == 1
    assert (out / "notes.txt").read_text() == "mine"  # only a run's own artifacts are deleted


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        _run(_config(tmp_path / "file"))


# ----------------------------------------------------------------------------- prediction


@pytest.fixture
def folder(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, x=np.random.default_rng(0).random((5, 64), np.float32))
    return path


def _weights(folder):
    with np.load(folder / "model.npz") as npz:
        return {k: npz[k] for k in npz.files if k != RUN_ID_KEY}, str(npz[RUN_ID_KEY])


def _write_posterior(folder, precision=1.0, run_id=None, **extra):
    mean, own_id = _weights(folder)
    arrays = {f"mean/{k}": v for k, v in mean.items()}
    arrays |= {f"precision/{k}": np.full_like(v, precision) for k, v in mean.items()}
    np.savez(folder / "posterior.npz", **arrays, **extra,
             **{RUN_ID_KEY: np.array(own_id if run_id is None else run_id)})


def _write_model(folder, change):
    weights, run_id = _weights(folder)
    np.savez(folder / "model.npz", **change(weights), **{RUN_ID_KEY: np.array(run_id)})


def _first(weights):
    return next(iter(weights))


BROKEN = [
    pytest.param(lambda f: _write_posterior(f, run_id="another-run"), "mixes two runs' files",
                 id="stale-posterior"),
    pytest.param(lambda f: _write_posterior(f, precision=0.0), "has values <= 0", id="precision-0"),
    pytest.param(lambda f: _write_posterior(f, precision=-1.0), "has values <= 0", id="precision<0"),
    pytest.param(lambda f: _write_posterior(f, precision=np.nan), "has non-finite values",
                 id="precision-nan"),
    pytest.param(lambda f: _write_model(f, lambda w: {k: v * np.inf for k, v in w.items()}),
                 "has non-finite values", id="model-inf"),
    pytest.param(lambda f: _write_model(f, lambda w: {**w, _first(w): np.zeros(3, np.float32)}),
                 "the network needs float", id="model-shape"),
    pytest.param(lambda f: _write_model(f, lambda w: {**w, _first(w): w[_first(w)].astype(np.int64)}),
                 "the network needs float", id="model-int-dtype"),
    pytest.param(lambda f: _write_model(f, lambda w: dict(list(w.items())[1:])),
                 "do not match the network's", id="model-key-missing"),
    pytest.param(lambda f: (f / "model.npz").write_bytes(b""), "is not a readable .npz",
                 id="model-empty"),
    pytest.param(lambda f: (f / "model.npz").unlink(), "neither model.npz nor posterior.npz",
                 id="model-missing"),
    pytest.param(lambda f: (f / "model.json").write_text("[1, 2]"), "is not a readable model card",
                 id="card-list"),
    pytest.param(lambda f: (f / "model.json").write_text(json.dumps(
        {**json.loads((f / "model.json").read_text()), "input-shape": [0, "x"]})),
        "is not a list of positive integers", id="card-shape"),
    pytest.param(lambda f: (f / "model.json").write_text(json.dumps(
        {**json.loads((f / "model.json").read_text()), "run-id": "other"})),
        "mixes two runs' files", id="card-other-run"),
]


@pytest.mark.parametrize(("damage", "fragment"), BROKEN)
def test_predict_refuses_a_broken_run_folder_in_one_line(folder, inputs, capsys, damage, fragment):
    damage(folder)
    assert predict_main([str(folder), str(inputs)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert fragment in err, err


def test_predict_uses_a_posterior_of_the_same_run(folder, inputs, capsys):
    _write_posterior(folder, precision=1e4)
    assert predict_main([str(folder), str(inputs), "--samples", "2"]) == 0
    assert capsys.readouterr().out.startswith("5 inputs, BMA over 2 draws")


def test_an_infeasible_partition_fails_the_run_at_start(tmp_path):
    # before: every node failed every round and the run "completed" with all rounds skipped
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="^run config: classes-per-client = 11 but 'digits' has 10 classes$"):
        _run(_config(out, partitioner="pathological", **{"classes-per-client": 11}))
    assert not out.exists()
