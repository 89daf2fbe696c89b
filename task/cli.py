"""`bayesfl`: the package's one command line.

    bayesfl run [--preset FILE.toml] [--run-config "k=v ..."] [flwr run options]
    bayesfl predict RUN_DIR INPUTS.npz [--samples 32] [--out predictions.npz]
                    [--abstain-entropy X | --coverage C]
    bayesfl federation start|status|stop|start-node ...   (scripts/launch_federation.py)
    bayesfl certs --out DIR [--san NAME_OR_IP ...]         (scripts/make_certs.py)

`run` simulates a federation with `flwr run` and succeeds only when the run completed: the
ServerApp marks results.json `"status": "completed"` after its last artifact, so a file left by
a failed or interrupted run does not count. `flwr run` refuses a TOML file beside key=value
pairs, so `run` merges the preset and the pairs into one file (`run-config.toml` in the run's
output folder, a record of what was asked) and validates it before starting anything.
`federation` and `certs` call the scripts of the source checkout (an editable install).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from task.config import ConfigError, parse_run_config

REPO = Path(__file__).resolve().parents[1]
RESULTS, RUN_CONFIG_FILE, COMPLETED = "results.json", "run-config.toml", "completed"


# ----------------------------------------------------------------------------- run


def merged_run_config(preset: str | None, overrides: list[str], cwd: Path) -> dict[str, Any]:
    """The preset's keys, then each `--run-config` string's (later ones win), validated.

    A relative `output-dir` or `resume-from` is made absolute against `cwd`: the ServerApp
    runs in another folder.
    """
    from flwr.common.config import parse_config_args

    values: dict[str, Any] = {}
    for source in ([preset] if preset else []) + overrides:
        if source.endswith(".toml") and not Path(source).expanduser().is_file():
            raise ConfigError(f"run config file '{source}' does not exist")
        try:
            values |= parse_config_args([source])
        except Exception as err:  # tomli's decode error, click's exception: one line either way
            message = getattr(err, "message", None) or str(err)
            raise ConfigError(f"cannot read run config '{source}': {message}") from None
    for key in ("output-dir", "resume-from"):
        if isinstance(values.get(key), str) and values[key]:
            values[key] = str((cwd / Path(values[key]).expanduser()).resolve())
    parse_run_config(values)
    return values


def output_folder(values: dict[str, Any], cwd: Path) -> Path:
    """Where the run writes: its `output-dir`, the folder it resumes, or a fresh one."""
    if values.get("output-dir"):
        return Path(values["output-dir"])
    if values.get("resume-from"):
        resumed = Path(values["resume-from"])
        return resumed.parent if resumed.is_file() else resumed
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return (cwd / "outputs" / f"{stamp}-{values.get('strategy', 'fedavg')}").resolve()


def run_status(folder: Path, since: float = 0.0) -> str:
    """The status the run in `folder` wrote to results.json after `since` (a time.time())."""
    results = folder / RESULTS
    try:
        if results.stat().st_mtime < since:
            return "not written by this run"
        return str(json.loads(results.read_text()).get("status", "no status"))
    except FileNotFoundError:
        return "no results.json"
    except (OSError, json.JSONDecodeError) as err:
        return f"unreadable results.json ({err})"


def run_federation(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bayesfl run",
        description="Simulate a federation with `flwr run`; exit 0 only when the run completed. "
        "Other options go to `flwr run`.",
    )
    parser.add_argument("--preset", help="a run-config TOML file, e.g. presets/fedpa-digits.toml")
    parser.add_argument("--run-config", "-c", action="append", default=[],
                        help='"key=value ..." overrides (or a TOML file); later ones win')
    parser.add_argument("--federation-config", action="append", default=[],
                        help='"key=value ..." for the simulation, e.g. "num-supernodes=20"')
    parser.add_argument("--num-supernodes", type=int,
                        default=int(os.environ.get("NUM_SUPERNODES", "10")),
                        help="simulated clients (default: $NUM_SUPERNODES or 10)")
    parser.add_argument("--app", type=Path, default=REPO, help="the Flower app folder")
    args, flwr_args = parser.parse_known_args(argv)
    cwd = Path.cwd()
    try:
        values = merged_run_config(args.preset, args.run_config, cwd)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    folder = output_folder(values, cwd)
    if not values.get("output-dir") and not values.get("resume-from"):
        values["output-dir"] = str(folder)
    from server_app.outputs import check_output_dir

    try:  # before this writes the run config there: the ServerApp would refuse the folder later
        check_output_dir(folder.resolve(), parse_run_config(values))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / RUN_CONFIG_FILE
    import tomli_w

    config_file.write_text(tomli_w.dumps(values))
    flwr = Path(sys.executable).with_name("flwr")
    command = [
        str(flwr) if flwr.exists() else "flwr", "run", str(args.app), "--stream",
        "--run-config", str(config_file),
        "--federation-config", f"num-supernodes={args.num_supernodes}",
        *(a for config in args.federation_config for a in ("--federation-config", config)),
        *flwr_args,
    ]
    # Use the installed packages instead of installing the app's dependencies for every run.
    env = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", **os.environ}
    started = time.time()
    code = subprocess.run(command, env=env).returncode
    status = run_status(folder, started)
    if code != 0 or status != COMPLETED:
        print(f"The run did not complete (flwr run exit {code}; results.json: {status}): "
              "see 'flwr ls' and 'flwr log <run-id> --show'.", file=sys.stderr)
        return code or 1
    print(f"Results: {folder} (results.json, metrics.png, model.npz, model.json)")
    return 0


# ----------------------------------------------------------------------------- the others


def _predict(argv: list[str]) -> int:
    from task.predict import main

    return main(argv, prog="bayesfl predict")


def _script(*command: str) -> list[str]:
    script = REPO / command[-1]
    if not script.is_file():
        raise ConfigError(
            f"{script} not found: this command needs the project's source checkout "
            "(pip install -e .)"
        )
    return [*command[:-1], str(script)]


def _federation(argv: list[str]) -> int:
    command = _script(sys.executable, "scripts/launch_federation.py")
    return subprocess.run([*command, *argv]).returncode


def _certs(argv: list[str]) -> int:
    return subprocess.run([*_script(sys.executable, "scripts/make_certs.py"), *argv]).returncode


COMMANDS = {
    "run": (run_federation, "simulate a federation (a preset and overrides), check it completed"),
    "predict": (_predict, "class probabilities and uncertainty from a finished run's folder"),
    "federation": (_federation, "start, inspect or stop a local deployment (SuperLink, SuperNodes)"),
    "certs": (_certs, "make a CA and a SuperLink certificate for TLS"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:  # the rest is the command's own, `--help` included
        handler, _ = COMMANDS[argv[0]]
        try:
            return handler(argv[1:])
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(
        prog="bayesfl",
        description="Bayesian federated learning on Flower. `bayesfl COMMAND --help` for more.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary)
    parser.parse_args(argv)  # prints help, or the error naming the unknown command
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
