"""Checkpoints after every round, and resuming a run whose ServerApp died."""

import json

import numpy as np
import pytest

from benchmarks.inprocess import InProcessGrid, _set_task_identity, default_run_config
from server_app.app import run
from server_app.checkpoint import CHECKPOINT, load_checkpoint
from task.config import ConfigError, parse_run_config


class ServerDied(Exception):
    pass


class CrashingGrid(InProcessGrid):
    """Raises out of the ServerApp during the training exchange of round `crash_round`."""

    def __init__(self, run_config, num_nodes, crash_round):
        super().__init__(run_config, num_nodes)
        self.crash_round = crash_round

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.group_id == str(self.crash_round):
            raise ServerDied
        return super().send_and_receive(messages, timeout=timeout)


SETTINGS = {
    "fedavg": {"server-momentum": 0.9, "server-lr": 0.5},
    "fedpa": {"burnin-rounds": 1, "local-epochs": 3},
    "bayes-admm": {"optimizer": "ivon", "lr": 0.0005, "temperature": 0.001, "hess-init": 0.001,
                   "eval-mc-samples": 4},
}


@pytest.mark.parametrize("strategy", sorted(SETTINGS))
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, strategy):
    _set_task_identity()
    base = {**default_run_config(), "strategy": strategy, "model": "logreg", "num-server-rounds": 4,
            "fraction-train": 0.5, "min-train-nodes": 2, "fraction-evaluate": 0.0, **SETTINGS[strategy]}

    whole = {**base, "output-dir": str(tmp_path / "whole")}
    run(InProcessGrid(whole, 6), parse_run_config(whole))

    broken = {**base, "output-dir": str(tmp_path / "broken")}
    grid = CrashingGrid(broken, 6, crash_round=3)
    with pytest.raises(ServerDied):
        run(grid, parse_run_config(broken))
    assert load_checkpoint(tmp_path / "broken").round == 2
    grid.crash_round = None  # the nodes live on; a new ServerApp resumes the run
    resumed = {**broken, "resume-from": str(tmp_path / "broken"), "output-dir": ""}
    run(grid, parse_run_config(resumed))

    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "broken" / "results.json").read_text())
    assert [r["round"] for r in b["rounds"]] == [1, 2, 3, 4] and b["resumed_at_round"] == [2]
    for key in ("accuracy", "nll", "ece", "sampled", "replies"):
        assert [r[key] for r in a["rounds"]] == [r[key] for r in b["rounds"]], key
    with np.load(tmp_path / "whole" / "model.npz") as x, np.load(tmp_path / "broken" / "model.npz") as y:
        for k in x.files:
            np.testing.assert_array_equal(x[k], y[k])


def _cfg(tmp_path, **overrides):
    return parse_run_config({**default_run_config(), "model": "logreg", "num-server-rounds": 3,
                             "output-dir": str(tmp_path / "new"), **overrides})


def test_resume_from_a_missing_checkpoint_fails_clearly_and_writes_nothing(tmp_path):
    _set_task_identity()
    cfg = _cfg(tmp_path, **{"resume-from": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(InProcessGrid(cfg.to_dict(), 2), cfg)
    assert not (tmp_path / "new").exists()


def test_resume_from_a_corrupt_checkpoint_fails_clearly(tmp_path):
    _set_task_identity()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / CHECKPOINT).write_bytes(b"not a zip")
    cfg = _cfg(tmp_path, **{"resume-from": str(tmp_path / "old")})
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        run(InProcessGrid(cfg.to_dict(), 2), cfg)
    assert not (tmp_path / "new").exists()


def test_resume_with_a_different_experiment_is_refused(tmp_path):
    _set_task_identity()
    first = _cfg(tmp_path, **{"output-dir": str(tmp_path / "old"), "num-server-rounds": 1})
    run(InProcessGrid(first.to_dict(), 2), first)
    cfg = _cfg(tmp_path, **{"resume-from": str(tmp_path / "old"), "lr": 0.5})
    with pytest.raises(ConfigError, match="'lr' = 0.5 but the checkpoint was made with 'auto'"):
        run(InProcessGrid(cfg.to_dict(), 2), cfg)
    finished = _cfg(tmp_path, **{"resume-from": str(tmp_path / "old"), "num-server-rounds": 1})
    with pytest.raises(ConfigError, match="nothing left to run"):
        run(InProcessGrid(finished.to_dict(), 2), finished)
