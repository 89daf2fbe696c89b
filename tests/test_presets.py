"""Every shipped run-config preset names only known keys with valid values."""

import tomllib
from pathlib import Path

import pytest

from task.config import parse_run_config

DEFAULTS = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
PRESETS = sorted(Path("presets").glob("*.toml"))


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"fedavg-digits", "fedpa-digits", "fedpa-emnist"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_is_a_valid_run_config(preset):
    overrides = tomllib.loads(preset.read_text())
    assert set(overrides) <= set(DEFAULTS), set(overrides) - set(DEFAULTS)
    cfg = parse_run_config({**DEFAULTS, **overrides})
    assert cfg.strategy == overrides["strategy"]
