"""Rounds through real Flower processes: `flwr run` (Ray simulation, local SuperLink), the no-op
app of `benchmarks/flower_floor` (Flower's own cost of a round), and the loopback deployment of
`scripts/launch_federation.py`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.inprocess import default_run_config
from benchmarks.system.report import split_row
from benchmarks.system.settings import ROOT, ROUND_BASE
from task.config import parse_run_config
from task.data import data_spec
from task.models import build_model
from tests.flower_runs import LocalFederation, run_config_string


FLOWER_FLOOR_APP = ROOT / "benchmarks" / "flower_floor"


def flwr_run(app_dir: Path, run_config: dict[str, Any], nodes: int, threads: int, tag: str) -> None:
    """`flwr run` of the app in `app_dir` on a private local SuperLink, to finished:completed."""
    with tempfile.TemporaryDirectory() as home:
        federation = LocalFederation(Path(home), app_dir)
        federation.env["OMP_NUM_THREADS"] = str(threads)
        try:
            run = federation.run(run_config_string(run_config), nodes)
        finally:
            federation.stop()
    if run.status != "finished:completed":
        raise RuntimeError(f"flwr run {tag}: {run.status}\n{run.logs[-3000:]}")


def flower_floor_rows(workload: str, workload_overrides: dict[str, Any], nodes: int, rounds: int,
                       threads: int, out: Path, repeat: int,
                       log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rounds of the no-op app (benchmarks/flower_floor) moving this workload's model: what a
    round costs in Flower's simulation with nothing of ours in it."""
    cfg = parse_run_config({**default_run_config(), **ROUND_BASE, **workload_overrides})
    num_params = sum(p.numel() for p in build_model(cfg, data_spec(cfg)).parameters())
    output = out / "runs" / f"flower-floor-{workload.replace(' ', '-')}-{repeat}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    flwr_run(FLOWER_FLOOR_APP, {"num-server-rounds": rounds, "num-params": num_params,
                                 "output": str(output)}, nodes, threads, f"flower-floor {workload}")
    floor = json.loads(output.read_text())["rounds"]
    log(f"flwr run of the no-op app ({workload}, P={num_params}): round {floor[-1]['seconds']:.2f} s")
    return [{"workload": workload, "strategy": "no-op app", "mode": "simulation", "repeat": repeat,
             "params": num_params,
             "clients": nodes, "round": r["round"], "round_seconds": r["seconds"]} for r in floor]


def deployment_rows(launcher: Path, label: dict[str, Any], overrides: dict, nodes: int,
                     local: dict[int, float], folder: Path, threads: int,
                     log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The same run through a SuperLink and N SuperNodes on loopback, started by the launcher
    (its documented CLI: `start --dir D --nodes N`, `flwr run . bayesfl` with FLWR_HOME=D/flwr-home,
    `stop --dir D`)."""
    if not launcher.exists():
        return [{**label, "mode": "deployment",
                 "status": "not run: scripts/launch_federation.py is not in this checkout"}]
    shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as fed:
        start = [sys.executable, str(launcher), "start", "--dir", fed, "--nodes", str(nodes)]
        stop = [sys.executable, str(launcher), "stop", "--dir", fed]
        try:
            subprocess.run(start, cwd=ROOT, env=env, check=True, capture_output=True, text=True,
                           timeout=600)
            run_env = {**env, "FLWR_HOME": str(Path(fed) / "flwr-home")}
            subprocess.run(
                ["flwr", "run", ".", "bayesfl", "--stream", "--run-config",
                 run_config_string({**overrides, "output-dir": str(folder)})],
                cwd=ROOT, env=run_env, check=True, capture_output=True, text=True, timeout=1800,
            )
            results = json.loads((folder / "results.json").read_text())
            if len(results["rounds"]) != overrides["num-server-rounds"]:
                raise RuntimeError(f"the run ended after {len(results['rounds'])} round(s)")
        except Exception as err:  # a failed deployment is a row of the table, not a crash
            detail = (getattr(err, "stderr", "") or "")[-500:]
            log(f"deployment {label['workload']} {label['strategy']} failed: {err}")
            return [{**label, "mode": "deployment", "status": f"failed: {err}; {detail}"}]
        finally:
            subprocess.run(stop, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    rows = [split_row(label, "deployment", e, None, local[e["round"]]) | {"status": "ok"}
            for e in results["rounds"]]
    log(f"deployment {label['workload']} {label['strategy']}: round {rows[-1]['round_seconds']:.2f} s")
    return rows
