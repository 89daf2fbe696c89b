"""End to end: `flwr run .` simulates a federation with the real Flower runtime."""

import json

import pytest

from task.methods import METHODS
from tests.flower_runs import LocalFederation, run_config_string

pytestmark = pytest.mark.e2e

ROUND_KEYS = {"round", "accuracy", "nll", "ece", "bytes_down", "bytes_up", "seconds"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = LocalFederation(tmp_path_factory.mktemp("flwr-home"))
    yield fed
    fed.stop()


@pytest.mark.parametrize("strategy", sorted(METHODS))
def test_strategy_on_heterogeneous_digits_with_10_clients(federation, tmp_path, strategy):
    out = tmp_path / "out"
    run = federation.run(
        f"strategy='{strategy}' dataset='digits' partitioner='dirichlet' dirichlet-alpha=0.5 "
        f"num-server-rounds=3 output-dir='{out}' {run_config_string(METHODS[strategy].short_run)}",
        num_supernodes=10,
    )
    assert run.status == "finished:completed", run.logs
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["strategy"] == strategy
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]
    for entry in results["rounds"]:
        assert ROUND_KEYS <= entry.keys()
        assert entry["replies"] == 10 and entry["bytes_down"] > 0 and entry["bytes_up"] > 0
        assert entry["rejected"] == entry["failed"] == 0 and entry["problems"] == []
    assert results["rounds"][-1]["accuracy"] > 0.25  # learning happened (chance is 0.1)
    assert (out / "metrics.png").stat().st_size > 0 and (out / "model.npz").exists()
    assert "[round 3/3]" in run.logs and f"Results: {out}" in run.logs
    if strategy == "bayes-admm":  # Bayesian model averaging and the posterior artifact
        assert all({"bma_accuracy", "bma_nll", "bma_ece"} <= r.keys() for r in results["rounds"])
        assert (out / "posterior.npz").exists()
    if strategy == "fedpa":  # sampling switches on after the burn-in round
        # An example-weighted mean over the clients: 2 up to rounding.
        samples = [r["train_fedpa_samples"] for r in results["rounds"]]
        assert samples == pytest.approx([0, 2, 2], rel=1e-12)


def test_invalid_value_fails_the_run_with_one_clear_line(federation, tmp_path):
    run = federation.run(f"lr=-1.0 output-dir='{tmp_path / 'bad'}'", num_supernodes=2)
    assert run.status == "finished:failed"
    assert "'lr' = -1.0 is invalid" in run.logs
    assert not (tmp_path / "bad").exists()
