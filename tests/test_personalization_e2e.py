"""End to end: personal models in a real `flwr run` simulation (Ray actors run the ClientApp)."""

import json

import numpy as np
import pytest

from task.methods import METHODS
from task.predict import main as predict_main
from tests.flower_runs import LocalFederation, run_config_string

pytestmark = pytest.mark.e2e


def test_posterior_personal_models_in_a_flower_simulation(tmp_path, capsys):
    federation = LocalFederation(tmp_path / "flwr-home")
    out = tmp_path / "out"
    try:
        run = federation.run(
            f"strategy='bayes-admm' dataset='digits' partitioner='pathological' "
            f"num-server-rounds=2 output-dir='{out}' personalize='posterior' "
            f"personal-weight='auto' personal-eval-every=1 "
            f"{run_config_string(METHODS['bayes-admm'].short_run)}",
            num_supernodes=4,
        )
    finally:
        federation.stop()
    assert run.status == "finished:completed", run.logs
    results = json.loads((out / "results.json").read_text())
    for entry in results["rounds"]:
        summary = entry["personalization"]
        assert summary["nodes"] == summary["nodes_with_personal_model"] == 4
        assert {"global", "personal", "personal_bma"} <= set(summary)
    assert (out / "personal.png").stat().st_size > 0
    files = sorted((out / "client-state").rglob("personal-*.npz"))
    assert len(files) == 4 and "Personal models of 4 node(s) kept" in run.logs
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.zeros((3, 64), np.float32))
    assert predict_main([str(out), str(inputs), "--personal", str(files[0]), "--samples", "2"]) == 0
    assert "BMA over 2 draws" in capsys.readouterr().out
