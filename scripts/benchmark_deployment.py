#!/usr/bin/env python3
"""Seconds per round of one run config in deployment (TLS, node authentication, real processes
on loopback) against the same config in simulation, and where the deployment's extra time goes.

    python scripts/benchmark_deployment.py --rounds 5

Prints a Markdown table (docs/DEPLOYMENT.md holds one). Uses the Flower beside this Python.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: `scripts` is not importable yet
    sys.path.insert(0, str(REPO))

from scripts.federation import (  # noqa: E402
    MEMBER_ENV,
    Federation,
    flower_version,
    free_port,
    marked_processes,
)

NUM_NODES = 3
# Polling intervals hard-coded in Flower (1.36 to 1.41), in seconds: an idle SuperNode asks the
# SuperLink for messages every 3 s, the ServerApp's send_and_receive pulls replies every 3 s,
# and each SuperExec asks its Runtime API for a task to launch every second.
POLLS = {"SuperNode pull": 3.0, "ServerApp pull": 3.0, "SuperExec task poll": 1.0}


def run_config(rounds: int, out: Path) -> str:
    return (
        f"strategy='fedavg' dataset='digits' model='logreg' local-epochs=1 fraction-evaluate=0.0 "
        f"num-server-rounds={rounds} min-train-nodes={NUM_NODES} seed=0 output-dir='{out}'"
    )


def wait_finished(flwr, run_id: int, connection: list[str], timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = flwr("ls", *connection, "--run-id", str(run_id), "--format", "json")
        if listed.returncode == 0:
            run = json.loads(listed.stdout)["runs"][0]
            if run["status"].startswith("finished"):
                if run["status"] != "finished:completed":
                    sys.exit(f"run {run_id} ended {run['status']}")
                return run
        time.sleep(2)
    sys.exit(f"run {run_id} did not finish in {timeout:.0f}s")


def round_seconds(out: Path) -> list[float]:
    return [r["seconds"] for r in json.loads((out / "results.json").read_text())["rounds"]]


def simulate(work: Path, rounds: int) -> list[float]:
    """The same config on the simulation engine (Ray), through a private local SuperLink."""
    marker = f"{work}#simulation"
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # flwr starts flower-superlink
        "FLWR_HOME": str(work / "sim-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        MEMBER_ENV: marker,  # the local SuperLink that `flwr run` leaves behind inherits it
    }

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir / "flwr"), *args], env=env,
                              capture_output=True, text=True, cwd=REPO, timeout=300)

    out = work / "sim-out"
    try:
        started = flwr("run", str(REPO), "--format", "json", "--run-config", run_config(rounds, out),
                       "--federation-config", f"num-supernodes={NUM_NODES}")
        wait_finished(flwr, int(json.loads(started.stdout)["run-id"]), [])
    finally:
        for pid in marked_processes(marker, prefix=False):
            os.kill(pid, signal.SIGTERM)
    return round_seconds(out)


def deploy(work: Path, rounds: int) -> tuple[list[float], dict, float, float]:
    """(seconds per round, the run's `flwr ls` record, TLS handshake s, plain connect s)."""
    fed = Federation.create(work / "federation", NUM_NODES, Path(sys.executable).parent)
    out = work / "deploy-out"
    try:
        fed.start()
        started = fed.flwr("run", str(REPO), fed.spec.connection, "--format", "json",
                           "--run-config", run_config(rounds, out))
        run = wait_finished(fed.flwr, int(json.loads(started.stdout)["run-id"]), [fed.spec.connection])
        handshake, connect = tls_handshake_seconds(fed)
    finally:
        fed.stop()
    return round_seconds(out), run, handshake, connect


def tls_handshake_seconds(fed: Federation, repeats: int = 20) -> tuple[float, float]:
    """Median seconds for a TLS handshake with the SuperLink's Fleet port, and for a bare TCP
    connect to it (Flower keeps connections open, so a node pays the handshake rarely)."""
    host, port = fed.fleet_address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(fed.certs / "ca.crt"))
    context.set_alpn_protocols(["h2", "http/1.1"])
    handshakes, connects = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        with socket.create_connection((host, int(port))) as raw:
            connects.append(time.perf_counter() - began)
            with context.wrap_socket(raw, server_hostname=host):
                handshakes.append(time.perf_counter() - began)
    return statistics.median(handshakes), statistics.median(connects)


def process_start_seconds(repeats: int = 3) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds for a fresh Python to import Flower's ClientApp runner, and to
    import this app's ClientApp module (torch, data, strategies): what every message pays. CPU
    seconds do not depend on what else the machine runs; wall seconds do."""
    def timed(code: str) -> tuple[float, float]:
        walls, cpus = [], []
        for _ in range(repeats):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            began = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
            walls.append(time.perf_counter() - began)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        return statistics.median(walls), statistics.median(cpus)

    return {
        "a fresh Python importing Flower's ClientApp runner": timed(
            "import flwr.supernode.cli.flwr_clientapp"
        ),
        "a fresh Python importing this app's ClientApp (Flower too, torch, data, strategies)": timed(
            "import client_app.app"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bayesfl-bench-") as tmp:
        work = Path(tmp)
        simulated = simulate(work, args.rounds)
        deployed, run, handshake, connect = deploy(work, args.rounds)
    starts = process_start_seconds()
    # Every round sends one train message per node; the run ends with one finish query each.
    clientapps = NUM_NODES * (args.rounds + 1)
    per_clientapp = run["compute-time"]["clientapp-seconds"] / clientapps
    load = os.getloadavg()[0]

    version = ".".join(map(str, flower_version(Path(sys.executable).parent)))
    print(f"flwr {version}, {NUM_NODES} nodes, {args.rounds} rounds\n")
    print("| | simulation | deployment |\n|---|---|---|")
    print(f"| seconds per round, median of {args.rounds} | {statistics.median(simulated):.1f} "
          f"| {statistics.median(deployed):.1f} |")
    print(f"| first round | {simulated[0]:.1f} | {deployed[0]:.1f} |")
    print()
    print("| where a deployment round's time goes | wall s | CPU s |\n|---|---|---|")
    print(f"| one ClientApp process, start to reply (SuperLink's compute-time / {clientapps}) "
          f"| {per_clientapp:.1f} | |")
    for name, (wall, cpu) in starts.items():
        print(f"| of which: {name} | {wall:.1f} | {cpu:.1f} |")
    for name, interval in POLLS.items():
        print(f"| {name} every {interval:.0f} s: mean wait per message | {interval / 2:.1f} | 0 |")
    print(f"| TLS handshake with the SuperLink (TCP connect alone: {connect * 1000:.1f} ms) "
          f"| {handshake:.3f} | |")
    print(f"\nload average (1 min) at the end: {load:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
