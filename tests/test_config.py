"""The run configuration: what validates, what is refused (and how), and pyproject agreement."""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from task.config import ConfigError, RunConfig, parse_run_config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _pyproject_defaults() -> dict:
    with PYPROJECT.open("rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def _alias_to_field() -> dict[str, str]:
    return {(info.alias or name): name for name, info in RunConfig.model_fields.items()}


# ----------------------------------------------------------------------------- good configs

GOOD = [
    pytest.param({}, {}, id="defaults"),
    pytest.param({"strategy": "fedavg"}, {"strategy": "fedavg"}, id="strategy-fedavg"),
    pytest.param({"optimizer": "sgd"}, {"optimizer": "sgd"}, id="optimizer-sgd"),
    *[
        pytest.param({"partitioner": p}, {"partitioner": p}, id=f"partitioner-{p}")
        for p in ("iid", "dirichlet", "pathological")
    ],
    *[pytest.param({"model": m}, {"model": m}, id=f"model-{m}") for m in ("logreg", "mlp", "cnn")],
    *[
        pytest.param({"activation": a}, {"activation": a}, id=f"activation-{a}")
        for a in ("relu", "sigmoid", "tanh")
    ],
    *[pytest.param({"device": d}, {"device": d}, id=f"device-{d}") for d in ("auto", "cpu", "cuda")],
    pytest.param({"dataset": "synthetic"}, {"dataset": "synthetic"}, id="dataset-synthetic"),
    pytest.param({"dataset": "mnist"}, {"dataset": "mnist"}, id="dataset-hf-id"),
    # boundary values
    pytest.param({"fraction-train": 1.0}, {"fraction_train": 1.0}, id="fraction-train=1"),
    pytest.param({"fraction-train": 1e-9}, {"fraction_train": 1e-9}, id="fraction-train-tiny"),
    pytest.param({"fraction-evaluate": 0.0}, {"fraction_evaluate": 0.0}, id="fraction-evaluate=0"),
    pytest.param({"fraction-evaluate": 1.0}, {"fraction_evaluate": 1.0}, id="fraction-evaluate=1"),
    pytest.param({"momentum": 0}, {"momentum": 0.0}, id="momentum=0"),
    pytest.param({"momentum": 0.999}, {"momentum": 0.999}, id="momentum=0.999"),
    pytest.param({"server-momentum": 0.0}, {"server_momentum": 0.0}, id="server-momentum=0"),
    pytest.param({"num-server-rounds": 1}, {"num_server_rounds": 1}, id="num-server-rounds=1"),
    pytest.param({"local-epochs": 1}, {"local_epochs": 1}, id="local-epochs=1"),
    pytest.param({"batch-size": 1}, {"batch_size": 1}, id="batch-size=1"),
    pytest.param({"min-train-nodes": 1}, {"min_train_nodes": 1}, id="min-train-nodes=1"),
    pytest.param({"classes-per-client": 1}, {"classes_per_client": 1}, id="classes-per-client=1"),
    pytest.param({"seed": 0}, {"seed": 0}, id="seed=0"),
    pytest.param({"seed": 2**32 - 1}, {"seed": 2**32 - 1}, id="seed-max"),
    pytest.param({"eval-mc-samples": 1024}, {"eval_mc_samples": 1024}, id="eval-mc-samples-max"),
    pytest.param({"mlp-hidden": "65536"}, {"mlp_hidden": "65536"}, id="mlp-widest"),
    pytest.param({"weight-decay": 0.0}, {"weight_decay": 0.0}, id="weight-decay=0"),
    pytest.param({"synthetic-alpha": 0, "synthetic-beta": 0},
                 {"synthetic_alpha": 0.0, "synthetic_beta": 0.0}, id="synthetic-0-0"),
    pytest.param({"test-fraction": 0.999}, {"test_fraction": 0.999}, id="test-fraction<1"),
    pytest.param({"dirichlet-alpha": 1e-3}, {"dirichlet_alpha": 1e-3}, id="dirichlet-alpha-small"),
    pytest.param({"lr": 1e-6}, {"lr": 1e-6}, id="lr-small"),
    pytest.param({"mlp-hidden": "64"}, {"mlp_hidden": "64", "hidden_sizes": (64,)}, id="mlp-one"),
    pytest.param({"mlp-hidden": " 32 , 16 ,8 "}, {"mlp_hidden": "32,16,8", "hidden_sizes": (32, 16, 8)},
                 id="mlp-spaces-normalised"),
    pytest.param({"mlp-hidden": "200,100,"}, {"mlp_hidden": "200,100", "hidden_sizes": (200, 100)},
                 id="mlp-trailing-comma"),
    pytest.param({"output-dir": "outputs/run1"}, {"output_dir": "outputs/run1"}, id="output-dir"),
    # Flower's TOML hands ints where floats are declared (lr = 1): accepted as the float.
    pytest.param({"lr": 1, "round-timeout": 30}, {"lr": 1.0, "round_timeout": 30.0}, id="int-for-float"),
]


@pytest.mark.parametrize(("raw", "expected"), GOOD)
def test_good_config_validates(raw, expected):
    cfg = parse_run_config(raw)
    assert isinstance(cfg, RunConfig)
    for attribute, value in expected.items():
        assert getattr(cfg, attribute) == value
    # every key not given keeps its default
    defaults = RunConfig()
    given = {_alias_to_field()[k] for k in raw}
    for name in RunConfig.model_fields:
        if name not in given:
            assert getattr(cfg, name) == getattr(defaults, name), name


def test_to_dict_round_trips_with_kebab_keys():
    raw = {"partitioner": "iid", "lr": 0.1, "mlp-hidden": "10,5", "num-server-rounds": 3}
    cfg = parse_run_config(raw)
    dumped = cfg.to_dict()
    assert set(dumped) == set(_alias_to_field())
    assert {k: dumped[k] for k in raw} == raw
    assert parse_run_config(dumped) == cfg


# ----------------------------------------------------------------------------- bad configs

BAD = [
    # (raw config, key, fragments the one-line message must contain)
    pytest.param({"strategy": "fedprox"}, "strategy", ["'fedprox'", "'fedavg'"], id="strategy"),
    pytest.param({"optimizer": "adam"}, "optimizer", ["'adam'", "'sgd'", "'ivon'"], id="optimizer"),
    pytest.param({"partitioner": "shards"}, "partitioner",
                 ["'shards'", "'iid'", "'dirichlet'", "'pathological'"], id="partitioner"),
    pytest.param({"model": "resnet"}, "model", ["'resnet'", "'logreg'", "'mlp'", "'cnn'"], id="model"),
    pytest.param({"device": "tpu"}, "device", ["'tpu'", "'auto'", "'cpu'", "'cuda'"], id="device"),
    pytest.param({"activation": "gelu"}, "activation", ["'gelu'"], id="activation"),
    pytest.param({"lr": 0}, "lr", ["= 0 ", "greater than 0"], id="lr=0"),
    pytest.param({"lr": -1}, "lr", ["= -1 ", "greater than 0"], id="lr=-1"),
    pytest.param({"lr": float("nan")}, "lr", ["= nan "], id="lr=nan"),
    pytest.param({"num-server-rounds": 0}, "num-server-rounds",
                 ["= 0 ", "greater than or equal to 1"], id="rounds=0"),
    pytest.param({"num-server-rounds": "ten"}, "num-server-rounds",
                 ["= 'ten' ", "valid integer"], id="rounds='ten'"),
    pytest.param({"num-server-rounds": 2.5}, "num-server-rounds",
                 ["= 2.5 ", "valid integer"], id="rounds=2.5"),
    pytest.param({"fraction-train": 0}, "fraction-train", ["= 0 ", "greater than 0"], id="fraction-train=0"),
    pytest.param({"fraction-train": 1.5}, "fraction-train",
                 ["= 1.5 ", "less than or equal to 1"], id="fraction-train=1.5"),
    pytest.param({"fraction-evaluate": -0.1}, "fraction-evaluate", ["= -0.1 "], id="fraction-evaluate<0"),
    pytest.param({"momentum": 1.0}, "momentum", ["= 1.0 ", "less than 1"], id="momentum=1"),
    pytest.param({"momentum": -0.5}, "momentum", ["= -0.5 "], id="momentum<0"),
    pytest.param({"server-momentum": 1.0}, "server-momentum", ["= 1.0 ", "less than 1"],
                 id="server-momentum=1"),
    pytest.param({"dirichlet-alpha": 0}, "dirichlet-alpha", ["= 0 ", "greater than 0"], id="alpha=0"),
    pytest.param({"test-fraction": 1.0}, "test-fraction", ["= 1.0 ", "less than 1"], id="test-fraction=1"),
    pytest.param({"test-fraction": 0}, "test-fraction", ["= 0 ", "greater than 0"], id="test-fraction=0"),
    pytest.param({"classes-per-client": 0}, "classes-per-client", ["= 0 "], id="classes-per-client=0"),
    pytest.param({"batch-size": 0}, "batch-size", ["= 0 "], id="batch-size=0"),
    pytest.param({"local-epochs": 0}, "local-epochs", ["= 0 "], id="local-epochs=0"),
    pytest.param({"seed": -1}, "seed", ["= -1 "], id="seed=-1"),
    pytest.param({"round-timeout": 0}, "round-timeout", ["= 0 "], id="round-timeout=0"),
    pytest.param({"synthetic-beta": -1}, "synthetic-beta", ["= -1 "], id="synthetic-beta<0"),
    pytest.param({"dataset": ""}, "dataset", ["= '' ", "at least 1 character"], id="dataset-empty"),
    pytest.param({"mlp-hidden": "200,x"}, "mlp-hidden",
                 ["= '200,x' ", "comma-separated list of positive integers"], id="mlp='200,x'"),
    pytest.param({"mlp-hidden": ""}, "mlp-hidden",
                 ["= '' ", "comma-separated list of positive integers"], id="mlp=''"),
    pytest.param({"mlp-hidden": "0"}, "mlp-hidden",
                 ["= '0' ", "comma-separated list of positive integers"], id="mlp='0'"),
    pytest.param({"mlp-hidden": "-5,10"}, "mlp-hidden",
                 ["= '-5,10' ", "comma-separated list of positive integers"], id="mlp='-5,10'"),
    pytest.param({"mlp-hidden": 200}, "mlp-hidden", ["= 200 ", "valid string"], id="mlp=int"),
    # upper bounds where a value would exhaust memory or time
    pytest.param({"mlp-hidden": "200,65537"}, "mlp-hidden", ["= '200,65537' ", "at most 65536"],
                 id="mlp-too-wide"),
    pytest.param({"eval-mc-samples": 1025}, "eval-mc-samples", ["= 1025 ", "less than or equal to 1024"],
                 id="eval-mc-samples>1024"),
    pytest.param({"seed": 2**32}, "seed", [f"= {2**32} ", "less than 4294967296"], id="seed=2**32"),
]


@pytest.mark.parametrize(("raw", "key", "fragments"), BAD)
def test_bad_config_is_one_line_naming_key_and_value(raw, key, fragments):
    with pytest.raises(ConfigError) as info:
        parse_run_config(raw)
    message = str(info.value)
    assert type(info.value) is ConfigError
    assert isinstance(info.value, ValueError)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"run config: '{key}' = {raw[key]!r} is invalid: ")
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "more problem" not in message  # exactly one thing was wrong


def test_unknown_key_names_it_and_lists_known_keys():
    with pytest.raises(ConfigError) as info:
        parse_run_config({"num-rounds": 5})
    message = str(info.value)
    assert "\n" not in message
    known = ", ".join(sorted(_alias_to_field()))
    assert message == f"run config: unknown key 'num-rounds' (= 5); known keys: {known}"


def test_unknown_key_next_to_valid_ones_is_still_refused():
    with pytest.raises(ConfigError, match=r"^run config: unknown key 'strategy-name' \(= 'fedavg'\)"):
        parse_run_config({"lr": 0.1, "strategy-name": "fedavg"})


def test_several_problems_report_the_first_and_count_the_rest():
    with pytest.raises(ConfigError) as info:
        parse_run_config({"lr": 0, "momentum": 1.0, "model": "resnet"})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("run config: '")
    assert message.endswith(" (and 2 more problem(s))")


def test_config_error_is_raised_without_pydantic_traceback_chain():
    with pytest.raises(ConfigError) as info:
        parse_run_config({"lr": -1})
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ is True


# ----------------------------------------------------------------------------- pyproject agreement


def test_pyproject_defaults_validate():
    defaults = _pyproject_defaults()
    cfg = parse_run_config(defaults)
    assert cfg == RunConfig()


def test_pyproject_keys_equal_run_config_aliases():
    assert set(_pyproject_defaults()) == set(_alias_to_field())
    # aliases are the kebab-case field names
    assert {alias: name for alias, name in _alias_to_field().items()} == {
        name.replace("_", "-"): name for name in RunConfig.model_fields
    }


@pytest.mark.parametrize("key", sorted(_pyproject_defaults()))
def test_pyproject_default_equals_model_default(key):
    field = RunConfig.model_fields[_alias_to_field()[key]]
    toml_value = _pyproject_defaults()[key]
    assert toml_value == field.default
    assert type(toml_value) is type(field.default)  # 600 vs 600.0 would change the TOML type


# ----------------------------------------------------------------------------- frozen, hashable


def test_run_config_is_frozen():
    cfg = parse_run_config({"lr": 0.1})
    with pytest.raises(ValidationError) as info:
        cfg.lr = 0.2
    assert info.value.errors()[0]["type"] == "frozen_instance"
    assert cfg.lr == 0.1


def test_run_config_is_hashable_and_equal_configs_share_a_cache_entry():
    a = parse_run_config({"partitioner": "iid", "seed": 3})
    b = parse_run_config({"seed": 3, "partitioner": "iid"})
    c = parse_run_config({"partitioner": "iid", "seed": 4})
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2

    calls = []

    @functools.lru_cache(maxsize=None)
    def cached(cfg: RunConfig) -> int:
        calls.append(cfg)
        return cfg.seed

    assert [cached(a), cached(b), cached(c), cached(a)] == [3, 3, 4, 3]
    assert calls == [a, c]
    assert cached.cache_info().hits == 2 and cached.cache_info().misses == 2


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"num-server-rounds": True}, "'num-server-rounds' = True is invalid"),
        ({"lr": float("inf")}, "'lr' = inf is invalid"),
        ({"round-timeout": float("inf")}, "'round-timeout' = inf is invalid"),
        ({"mlp-hidden": "²"}, "comma-separated list of positive integers"),
    ],
)
def test_counts_are_strict_and_floats_finite(raw, fragment):
    with pytest.raises(ConfigError) as err:
        parse_run_config(raw)
    assert fragment in str(err.value) and "\n" not in str(err.value)
