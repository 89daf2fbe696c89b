"""The method registry (`task.methods`) is what the config, the server and the client read."""

import subprocess
import sys
from typing import get_args

import pytest

from client_app.app import CLIENT_STEPS
from strategies import STRATEGIES
from strategies.base import FederatedStrategy
from task.config import ConfigError, OptimizerName, RunConfig, StrategyName, parse_run_config
from task.methods import METHODS, resolve

POSTERIORS = get_args(RunConfig.model_fields["posterior"].annotation)


def test_config_server_and_client_know_the_same_methods():
    assert get_args(StrategyName) == tuple(METHODS)
    assert list(STRATEGIES) == list(CLIENT_STEPS) == list(METHODS)
    for name, method in METHODS.items():
        assert STRATEGIES[name] is resolve(method.server) and issubclass(STRATEGIES[name], FederatedStrategy)
        assert CLIENT_STEPS[name] is resolve(method.client) and callable(CLIENT_STEPS[name])


@pytest.mark.parametrize("strategy", sorted(METHODS))
@pytest.mark.parametrize("optimizer", get_args(OptimizerName))
@pytest.mark.parametrize("posterior", POSTERIORS)
def test_config_accepts_exactly_the_registered_optimizers(strategy, optimizer, posterior):
    raw = {"strategy": strategy, "optimizer": optimizer, "posterior": posterior}
    allowed = METHODS[strategy].optimizers
    if allowed is None or optimizer in allowed[posterior]:
        assert parse_run_config(raw).optimizer == optimizer
    else:
        with pytest.raises(ConfigError) as err:
            parse_run_config(raw)
        needed = " or ".join(f"'{o}'" for o in allowed[posterior])
        assert str(err.value) == (
            f"run config: strategy '{strategy}' with posterior '{posterior}' needs optimizer "
            f"{needed}, got '{optimizer}'"
        )


def test_bayes_admm_fits_a_diagonal_posterior_with_ivon_and_an_isotropic_one_with_sgd():
    with pytest.raises(ConfigError, match="needs optimizer 'ivon', got 'sgd'"):
        parse_run_config({"strategy": "bayes-admm", "optimizer": "sgd"})
    with pytest.raises(ConfigError, match="needs optimizer 'sgd', got 'ivon'"):
        parse_run_config({"strategy": "bayes-admm", "optimizer": "ivon", "posterior": "isotropic"})


@pytest.mark.parametrize("strategy", sorted(METHODS))
def test_short_run_settings_are_a_valid_config(strategy):
    assert parse_run_config({"strategy": strategy, **METHODS[strategy].short_run}).strategy == strategy


def test_the_config_imports_neither_half():
    code = "import sys, task.config; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for heavy in ("torch", "flwr", "strategies", "client_app", "server_app"):
        assert f"'{heavy}'" not in loaded.stdout
