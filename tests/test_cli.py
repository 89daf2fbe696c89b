"""The `bayesfl` console command: preset + overrides merged for `flwr run`, success only for a
completed run, and the command installed in the venv."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from task import cli
from task.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "presets" / "fedavg-digits.toml"


# ----------------------------------------------------------------------------- merging


def test_preset_then_overrides_later_ones_win(tmp_path):
    values = cli.merged_run_config(
        str(PRESET), ["num-server-rounds=3 model='logreg'", "model='mlp' output-dir='runs/a'"],
        tmp_path,
    )
    preset = tomllib.loads(PRESET.read_text())
    assert values == {**preset, "num-server-rounds": 3, "model": "mlp",
                      "output-dir": str(tmp_path / "runs" / "a")}


def test_overrides_alone_and_several_files(tmp_path):
    assert cli.merged_run_config(None, ["seed=4"], tmp_path) == {"seed": 4}
    other = tmp_path / "other.toml"
    other.write_text('strategy = "fedpa"\nseed = 9\n')
    values = cli.merged_run_config(str(PRESET), [str(other), "seed=5"], tmp_path)
    assert values["strategy"] == "fedpa" and values["seed"] == 5 and values["lr"] == 0.1
    assert cli.merged_run_config(None, [], tmp_path) == {}


def test_resume_from_is_made_absolute_and_is_the_output_folder(tmp_path):
    values = cli.merged_run_config(None, ["resume-from='old/run'"], tmp_path)
    assert values == {"resume-from": str(tmp_path / "old" / "run")}
    assert cli.output_folder(values, tmp_path) == tmp_path / "old" / "run"
    fresh = cli.output_folder({"strategy": "fedpa"}, tmp_path)
    assert fresh.parent == tmp_path / "outputs" and fresh.name.endswith("-fedpa")


@pytest.mark.parametrize(("preset", "overrides", "message"), [
    (None, ["lr=-1"], "run config: 'lr' = -1 is invalid: Input should be greater than 0"),
    (None, ["learning-rate=0.1"], "run config: unknown key 'learning-rate' (= 0.1); known keys: "),
    ("presets/none.toml", [], "run config file 'presets/none.toml' does not exist"),
    (None, ["lr=fast"], "cannot read run config 'lr=fast': The provided configuration "),
], ids=["bad-value", "unknown-key", "no-preset", "unparsable"])
def test_bad_run_config_is_one_line_before_anything_starts(tmp_path, preset, overrides, message):
    with pytest.raises(ConfigError) as info:
        cli.merged_run_config(preset, overrides, REPO)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- completion


def test_run_status_reads_what_this_run_wrote(tmp_path):
    assert cli.run_status(tmp_path) == "no results.json"
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"status": "running", "rounds": [{"round": 1}]}))
    assert cli.run_status(tmp_path) == "running"
    results.write_text(json.dumps({"status": "completed"}))
    assert cli.run_status(tmp_path) == "completed"
    assert cli.run_status(tmp_path, since=time.time() + 60) == "not written by this run"
    results.write_text("{")
    assert cli.run_status(tmp_path).startswith("unreadable results.json")


def _fake_flwr(monkeypatch, write):
    """`flwr run` replaced: `write(folder)` plays the ServerApp; returns the command it got."""
    seen = []

    def fake_run(command, env):
        seen.append((command, env))
        config = tomllib.loads(Path(command[command.index("--run-config") + 1]).read_text())
        write(Path(config["output-dir"]))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    return seen


def test_run_fails_when_the_run_stopped_after_a_round(tmp_path, monkeypatch, capsys):
    def crash_after_round_one(folder):  # results.json exists, but the run never completed
        (folder / "results.json").write_text(json.dumps({"status": "running", "rounds": [{}]}))

    _fake_flwr(monkeypatch, crash_after_round_one)
    out = tmp_path / "run"
    assert cli.main(["run", "--run-config", f"output-dir='{out}'"]) == 1
    assert capsys.readouterr().err.startswith(
        "The run did not complete (flwr run exit 0; results.json: running)")


def test_run_succeeds_on_a_completed_run_and_passes_flwr_its_options(tmp_path, monkeypatch, capsys):
    def complete(folder):
        (folder / "results.json").write_text(json.dumps({"status": "completed"}))

    seen = _fake_flwr(monkeypatch, complete)
    out = tmp_path / "run"
    code = cli.main(["run", "--preset", str(PRESET), "--run-config", f"seed=3 output-dir='{out}'",
                     "--num-supernodes", "4", "--federation-config", "client-resources-num-cpus=1",
                     "--format", "json"])
    assert code == 0 and capsys.readouterr().out.startswith(f"Results: {out} ")
    [(command, env)] = seen
    assert command[1:] == ["run", str(REPO), "--stream", "--run-config", str(out / "run-config.toml"),
                           "--federation-config", "num-supernodes=4",
                           "--federation-config", "client-resources-num-cpus=1", "--format", "json"]
    assert tomllib.loads((out / "run-config.toml").read_text()) == {
        **tomllib.loads(PRESET.read_text()), "seed": 3, "output-dir": str(out)}
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


# ----------------------------------------------------------------------------- the command


def _bayesfl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("bayesfl")), *args],
                          capture_output=True, text=True, timeout=120)


def test_console_command_is_installed_and_lists_its_commands():
    done = _bayesfl("--help")
    assert done.returncode == 0, done.stderr
    for command in ("run", "predict", "federation", "certs"):
        assert f"    {command}" in done.stdout


def test_console_predict_refuses_zero_samples_in_one_line(tmp_path):
    done = _bayesfl("predict", str(tmp_path), str(tmp_path / "x.npz"), "--samples", "0")
    assert done.returncode == 2
    assert done.stderr == "error: --samples must be at least 1, got 0\n"


# ----------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_bayesfl_run_simulates_a_preset_with_overrides(tmp_path):
    """What scripts/run_federation.sh does after setting up .venv, with the real `flwr run`."""
    from tests.flower_runs import LocalFederation

    federation = LocalFederation(tmp_path / "flwr-home")
    out = tmp_path / "run"
    try:
        done = subprocess.run(
            [str(Path(sys.executable).with_name("bayesfl")), "run", "--preset", str(PRESET),
             "--run-config", f"num-server-rounds=2 model='logreg' output-dir='{out}'",
             "--num-supernodes", "3"],
            cwd=tmp_path, env=federation.env, capture_output=True, text=True, timeout=600,
        )
    finally:
        federation.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().endswith(
        f"Results: {out} (results.json, metrics.png, model.npz, model.json)")
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and len(results["rounds"]) == 2
    assert results["config"]["dirichlet-alpha"] == 0.1 and results["config"]["model"] == "logreg"
    assert (out / "model.json").exists()


def test_console_federation_and_certs_call_the_project_scripts(tmp_path):
    done = _bayesfl("federation", "--help")
    assert done.returncode == 0 and "start" in done.stdout and "stop" in done.stdout
    done = _bayesfl("certs", "--out", str(tmp_path / "certs"), "--san", "superlink.example.org")
    assert done.returncode == 0, done.stderr
    assert {"ca.crt", "server.pem", "server.key"} <= {p.name for p in (tmp_path / "certs").iterdir()}


def test_run_refuses_a_folder_that_holds_files_before_writing_there(tmp_path, monkeypatch, capsys):
    seen = _fake_flwr(monkeypatch, lambda folder: pytest.fail("flwr run started"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert cli.main(["run", "--run-config", f"output-dir='{out}'"]) == 2
    assert capsys.readouterr().err.startswith(f"error: output-dir: {out} already holds 1 file(s)")
    assert not seen and sorted(p.name for p in out.iterdir()) == ["results.json"]
