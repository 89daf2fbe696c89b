"""Every strategy/optimizer combination learns with its defaults (issue 13, section 1), and the
"auto" keys resolve as documented.

Each combination runs a small in-process federation (the real ServerApp loop, strategies and
ClientApp handlers) with no key set but the ones that choose it (benchmarks/defaults.py) and the
size of the run: 4 clients on digits, a few rounds. Everything else is the default of
pyproject.toml, so a default that stops learning fails here. The full-size measurement (10
clients, Dirichlet(0.1), 30 rounds, 3 seeds) is `python benchmarks/defaults.py`.
"""

from __future__ import annotations

import logging
import math

import pytest

from benchmarks.defaults import COMBINATIONS
from benchmarks.inprocess import simulate
from task.config import (
    AUTO_BETA2_SHARE,
    AUTO_LR,
    AUTO_RHO,
    ConfigError,
    auto_beta2,
    parse_run_config,
)
from task.methods import METHODS

NUM_NODES = 4
ROUNDS = 4
CHANCE = 0.1  # digits: 10 balanced classes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per combination, its rounds' server metrics; run lazily, once per module."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    done: dict[str, list[dict]] = {}

    def run(combination: str) -> list[dict]:
        if combination not in done:
            folder = tmp_path_factory.mktemp(combination.split(" ")[0])
            keys = {**COMBINATIONS[combination], "dataset": "digits", "seed": 0,
                    "num-server-rounds": ROUNDS, "fraction-evaluate": 0.0,
                    "output-dir": str(folder)}
            done[combination] = simulate(keys, NUM_NODES).results["rounds"]
        return done[combination]

    return run


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_defaults_learn(runs, combination):
    rounds = runs(combination)
    first, last = rounds[0], rounds[-1]
    assert all(r["replies"] == NUM_NODES and not r["skipped"] for r in rounds), rounds
    assert last["accuracy"] >= 5 * CHANCE, (combination, [r["accuracy"] for r in rounds])
    assert last["accuracy"] > first["accuracy"], (combination, [r["accuracy"] for r in rounds])
    assert last["nll"] < min(first["nll"], math.log(10)), (combination, [r["nll"] for r in rounds])


# ----------------------------------------------------------------------------- "auto" keys


def test_auto_lr_is_the_chosen_optimizers_own_and_a_number_is_kept():
    assert parse_run_config({"optimizer": "sgd"}).local_lr == AUTO_LR["sgd"] == 0.1
    assert parse_run_config({"optimizer": "ivon"}).local_lr == AUTO_LR["ivon"] == 1e-3
    assert parse_run_config({"optimizer": "ivon", "lr": 0.05}).local_lr == 0.05
    with pytest.raises(ConfigError, match="'lr' = 'fast' is invalid: must be a number or 'auto'"):
        parse_run_config({"lr": "fast"})
    with pytest.raises(ConfigError, match="'lr'"):
        parse_run_config({"lr": 0.0})


def test_auto_lr_is_the_methods_own_where_it_sets_one():
    bayes_admm = {"strategy": "bayes-admm", "optimizer": "ivon"}
    assert METHODS["bayes-admm"].auto_lr == {"ivon": 3e-3}
    assert parse_run_config(bayes_admm).local_lr == 3e-3
    assert parse_run_config({**bayes_admm, "lr": 1e-3}).local_lr == 1e-3
    # The method's table covers IVON only: its isotropic SGD client keeps SGD's own rate, and
    # FedAvg's IVON client keeps IVON's.
    isotropic = {"strategy": "bayes-admm", "optimizer": "sgd", "posterior": "isotropic"}
    assert parse_run_config(isotropic).local_lr == AUTO_LR["sgd"]
    assert parse_run_config({"strategy": "fedavg", "optimizer": "ivon"}).local_lr == AUTO_LR["ivon"]


@pytest.mark.parametrize(
    "num_examples, batch_size, epochs", [(115, 32, 5), (300, 32, 10), (7, 64, 1)]
)
def test_auto_beta2_takes_in_the_same_share_of_a_round_on_every_client(
    num_examples, batch_size, epochs
):
    cfg = parse_run_config({"optimizer": "ivon", "batch-size": batch_size, "local-epochs": epochs})
    steps = epochs * math.ceil(num_examples / batch_size)
    assert cfg.steps_per_round(num_examples) == steps
    beta2 = cfg.local_beta2(num_examples)
    assert 0 < beta2 < 1
    assert math.isclose(1 - beta2**steps, AUTO_BETA2_SHARE, rel_tol=1e-12)
    # The share the digits sweeps chose: beta2 = 0.998 at 40 steps per round.
    assert math.isclose(auto_beta2(40), 0.998, rel_tol=1e-12)
    assert parse_run_config({"beta2": 0.9998}).local_beta2(num_examples) == 0.9998
    with pytest.raises(ValueError):
        auto_beta2(0)


def test_auto_rho_follows_the_posterior_family():
    diagonal = parse_run_config({"strategy": "bayes-admm", "optimizer": "ivon"})
    isotropic = parse_run_config(
        {"strategy": "bayes-admm", "optimizer": "sgd", "posterior": "isotropic"}
    )
    assert (diagonal.admm_rho, isotropic.admm_rho) == (AUTO_RHO["diagonal"], AUTO_RHO["isotropic"])
    assert parse_run_config({"posterior": "isotropic", "rho": 0.3}).admm_rho == 0.3
