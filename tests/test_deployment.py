"""End to end on real processes: one SuperLink and three SuperNodes on loopback with TLS and
SuperNode authentication on, started by scripts/launch_federation.py, once with the default
flwr (Fleet API over HTTPS) and once with flwr 1.36 from .venv-flwr136 (Fleet API over gRPC).

Each environment gets one federation for the whole module. Every deployment message starts a
fresh ClientApp process that imports torch (seconds on two cores), so runs are kept to two
rounds of logistic regression on digits without client-side evaluation, and the strategies'
runs share the federation at the same time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from client_app.state import read_state_file, state_digest
from scripts.federation import Federation
from server_app.checkpoint import load_checkpoint
from task.config import ConfigError
from task.methods import METHODS
from tests.flower_runs import run_config_string

pytestmark = pytest.mark.deployment

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENTS = {
    "default": Path(sys.executable).parent,  # the flwr installed with the test runner
    "flwr136": REPO / ".venv-flwr136" / "bin",  # made by scripts/setup_flwr136.sh
}
NUM_NODES = 3
# The strategy whose clients keep state (duals) between rounds; the restart test checks it.
STATEFUL_STRATEGY = "bayes-admm"
# The compressed run of the strategy runs: BayesADMM with q8 both ways, differences to the
# shared reference (task/compression.py).
COMPRESSED_RUN = "bayes-admm-q8"
COMPRESSED = {"uplink-codec": "q8", "downlink-codec": "q8", "codec-reference": "shift"}
SHORT_RUN = {"dataset": "digits", "model": "logreg", "local-epochs": 1, "fraction-evaluate": 0.0,
             "seed": 0}


def short_run(strategy: str, **settings: Any) -> str:
    """A --run-config string for a short run of `strategy` (each key once: flwr rejects repeats)."""
    config = {"strategy": strategy, **SHORT_RUN, **METHODS[strategy].short_run, **settings}
    return run_config_string(config)


@pytest.fixture(scope="module", params=sorted(ENVIRONMENTS))
def federation(request, tmp_path_factory):
    bin_dir = ENVIRONMENTS[request.param]
    assert (bin_dir / "flower-superlink").exists(), (
        f"{bin_dir} has no Flower; run scripts/setup.sh and scripts/setup_flwr136.sh"
    )
    fed = Federation.create(tmp_path_factory.mktemp(f"federation-{request.param}"), NUM_NODES, bin_dir)
    try:
        fed.start(timeout=120)
        yield fed
    finally:
        fed.stop()
        assert fed.processes() == [], "processes of the federation survived its stop"


def submit(fed: Federation, run_config: str) -> int:
    started = fed.flwr("run", str(REPO), fed.spec.connection, "--format", "json",
                       "--run-config", run_config)
    reply = json.loads(started.stdout)
    assert started.returncode == 0 and reply.get("success"), started.stdout + started.stderr
    return int(reply["run-id"])


def run_status(fed: Federation, run_id: int) -> str:
    listed = fed.flwr("ls", fed.spec.connection, "--run-id", str(run_id), "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return json.loads(listed.stdout)["runs"][0]["status"]


def wait_finished(fed: Federation, run_id: int, out: Path, timeout: float) -> str:
    """Until the run is over. A `flwr ls` costs about a CPU-second, which the federation needs
    on two cores, so this watches the run's own final file and asks the SuperLink only every
    15 s (to notice a failed run) and once that file is there."""
    deadline = time.monotonic() + timeout
    ask_at = time.monotonic() + 15
    while True:
        if (out / "model.npz").exists() or time.monotonic() > ask_at:
            status = run_status(fed, run_id)
            if status.startswith("finished"):
                return status
            ask_at = time.monotonic() + 15
        assert time.monotonic() < deadline, (
            f"run {run_id} not finished after {timeout:.0f}s\n{run_logs(fed, run_id)}"
        )
        time.sleep(0.5)


def run_logs(fed: Federation, run_id: int) -> str:
    return fed.flwr("log", str(run_id), fed.spec.connection, "--show").stdout


def rounds_written(out: Path) -> list[dict]:
    try:
        return json.loads((out / "results.json").read_text())["rounds"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def checkpointed_round(out: Path) -> int:
    try:
        return load_checkpoint(out).round
    except ConfigError:  # not written yet
        return 0


def wait_for(condition, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(poll)
    return value


def test_superlink_serves_tls_with_the_generated_certificate(federation):
    context = ssl.create_default_context(cafile=str(federation.certs / "ca.crt"))
    context.set_alpn_protocols(["h2", "http/1.1"])  # the gRPC ports speak HTTP/2 only
    for address in {federation.fleet_address, federation.control_address}:
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                names = [v for _, v in tls.getpeercert()["subjectAltName"]]
        assert {"localhost", "127.0.0.1"} <= set(names)
    banner = federation.log_path("superlink").read_text()
    if federation.spec.grpc_fleet:
        assert "Starting Fleet API (gRPC-rere)" in banner
    else:
        assert "Uvicorn running on https://" in banner


@pytest.fixture(scope="module")
def strategy_runs(federation, tmp_path_factory):
    """A short run of every registered strategy, and a compressed BayesADMM run, all submitted at
    once: the SuperLink runs them side by side and every node serves all of them, so one run's
    polling and start-up waits overlap the others' work. Maps strategy (or COMPRESSED_RUN) ->
    (run id, output dir, final status)."""
    submitted = {}
    for name in [*sorted(METHODS), COMPRESSED_RUN]:
        strategy, codecs = (STATEFUL_STRATEGY, COMPRESSED) if name == COMPRESSED_RUN else (name, {})
        out = tmp_path_factory.mktemp(f"run-{name}") / "out"
        run_id = submit(
            federation,
            short_run(
                strategy, **{"num-server-rounds": 2, "min-train-nodes": NUM_NODES,
                             "round-timeout": 300, "output-dir": str(out), **codecs}
            ),
        )
        submitted[name] = (run_id, out)
    return {
        name: (run_id, out, wait_finished(federation, run_id, out, timeout=420))
        for name, (run_id, out) in submitted.items()
    }


@pytest.mark.parametrize("strategy", sorted(METHODS))
def test_strategy_completes_a_short_run(federation, strategy_runs, strategy):
    run_id, out, status = strategy_runs[strategy]
    logs = run_logs(federation, run_id)
    assert status == "finished:completed", logs
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["strategy"] == strategy
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for entry in results["rounds"]:
        assert entry["replies"] == NUM_NODES and not entry["skipped"], entry
    if strategy == "fedpa":  # round 2 took the posterior-sampling path, not FedAvg's
        assert results["rounds"][1]["train_fedpa_samples"] == 2, results["rounds"][1]
    assert (out / "model.npz").exists() and f"Results: {out}" in logs


def test_compressed_bayes_admm_run_completes_over_real_nodes(federation, strategy_runs):
    """q8 both ways with the shift: round 1 sends the global in full, round 2 the difference to
    round 1's, which each node's ClientApp (a fresh process) reads back from its state file."""
    run_id, out, status = strategy_runs[COMPRESSED_RUN]
    assert status == "finished:completed", run_logs(federation, run_id)
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    _, fp32_out, _ = strategy_runs[STATEFUL_STRATEGY]
    fp32_rounds = json.loads((fp32_out / "results.json").read_text())["rounds"]
    for entry, fp32 in zip(rounds, fp32_rounds):
        assert entry["replies"] == NUM_NODES and not entry["problems"], entry
        assert entry["compression_up"] > 2 and entry["bytes_up"] < fp32["bytes_up"] / 2
    assert rounds[0]["compression_down"] == 1.0 and rounds[1]["compression_down"] > 2
    assert abs(rounds[1]["accuracy"] - fp32_rounds[1]["accuracy"]) < 0.1


@pytest.fixture(scope="module")
def crash_drill(federation, tmp_path_factory):
    """A stateful run during which node 2 dies (SIGKILL to it and its ClientApps) after round 1,
    and comes back with the same key and state-dir once the SuperLink has noticed. Returns
    what the tests below check."""
    assert STATEFUL_STRATEGY in METHODS, f"{STATEFUL_STRATEGY} is not registered"
    victim, out = NUM_NODES - 1, tmp_path_factory.mktemp("crash-drill") / "out"
    # round-timeout: above a normal round on a busy 2-core machine (about 25 s) and above the
    # 60 s the SuperLink may take to notice a dead node, so round 2 ends when it does.
    run_id = submit(
        federation,
        short_run(
            STATEFUL_STRATEGY, **{"num-server-rounds": 5, "min-train-nodes": NUM_NODES - 1,
                                  "round-timeout": 60, "output-dir": str(out)}
        ),
    )
    # Between rounds, not while the node uploads a reply: a reply cut off mid-upload stalls the
    # ServerApp for Flower's 180 s object-push session, whatever the round timeout.
    # The checkpoint, written just after results.json, names the state key the files carry.
    wait_for(lambda: checkpointed_round(out) >= 1, 240, "the round-1 checkpoint", poll=0.2)
    federation.stop_node(victim, crash=True)
    # Nothing writes the file once the node is dead: this is the state it died with. Clients
    # file it under the run's state key, which the checkpoint carries.
    # (named with its node id too: run-<key>-node-<id>.npz; the node's state-dir is its own).
    [state_file] = federation.state_dir(victim).glob(f"run-{load_checkpoint(out).state_key}-node-*.npz")
    died_in_round, arrays = read_state_file(state_file)
    died_with = state_digest(arrays)
    log_before_restart = len(federation.log_path(f"node-{victim}").read_text())
    # Back only after a round ended without it: restarted sooner, it can still pull and answer
    # the round it died in, and the run never goes without it.
    wait_for(lambda: any(r["replies"] == NUM_NODES - 1 for r in rounds_written(out)), 180,
             "a round without the dead node")
    # start_node first waits until the SuperLink counts the node offline (up to 60 s).
    federation.start_node(victim, timeout=120)
    status = wait_finished(federation, run_id, out, timeout=360)
    return {
        "status": status,
        "logs": run_logs(federation, run_id),
        "rounds": rounds_written(out),
        "run_id": run_id,
        "state_file": state_file,
        "died_in_round": died_in_round,
        "died_with": died_with,
        "victim_log": federation.log_path(f"node-{victim}").read_text()[log_before_restart:],
    }


def test_run_completes_when_a_node_dies_mid_run(crash_drill):
    assert crash_drill["status"] == "finished:completed", crash_drill["logs"]
    rounds = crash_drill["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    without_victim = [r for r in rounds if r["replies"] == NUM_NODES - 1]
    assert without_victim and not any(r["skipped"] for r in rounds), rounds


def test_restarted_node_rejoins_with_the_state_it_died_with(crash_drill):
    restores = re.findall(
        r"Restored client state of run (\d+) from (\S+) \(round (\d+), sha256 ([0-9a-f]{64})\)",
        crash_drill["victim_log"],
    )
    assert restores, crash_drill["victim_log"][-3000:]
    run_id, path, saved_round, digest = restores[0]
    assert int(run_id) == crash_drill["run_id"] and Path(path) == crash_drill["state_file"]
    assert int(saved_round) == crash_drill["died_in_round"]
    assert digest == crash_drill["died_with"]
    # It took part again: after a round without it, a round heard from every node.
    replies = [r["replies"] for r in crash_drill["rounds"]]
    first_gap = replies.index(NUM_NODES - 1)
    assert NUM_NODES in replies[first_gap + 1:], crash_drill["rounds"]


@pytest.fixture(scope="module")
def server_crash_drill(federation, tmp_path_factory):
    """A stateful run whose ServerApp is killed (SIGKILL) after round 2, then resumed with
    `resume-from` as a new run on the same SuperLink and nodes."""
    out = tmp_path_factory.mktemp("server-crash") / "out"
    settings = short_run(
        STATEFUL_STRATEGY, **{"num-server-rounds": 4, "min-train-nodes": NUM_NODES,
                              "round-timeout": 300, "output-dir": str(out)}
    )
    first_run = submit(federation, settings)
    # results.json gets a round's entry just before its checkpoint is written: wait for the
    # checkpoint, which is what the kill is meant to follow.
    wait_for(lambda: checkpointed_round(out) >= 2, 300, "the round-2 checkpoint", poll=0.2)
    serverapps = [
        pid for pid in federation.processes("superlink")
        if "flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    ]
    assert serverapps, "no ServerApp process found"
    for pid in serverapps:
        os.kill(pid, signal.SIGKILL)
    checkpoint_round = load_checkpoint(out).round
    node_logs_before = [len(federation.log_path(f"node-{i}").read_text()) for i in range(NUM_NODES)]
    resumed_run = submit(federation, f"{settings} resume-from='{out}'")
    status = wait_finished(federation, resumed_run, out, timeout=420)
    return {
        "first_run": first_run,
        "status": status,
        "logs": run_logs(federation, resumed_run),
        "results": json.loads((out / "results.json").read_text()),
        "checkpoint_round": checkpoint_round,
        "node_logs": [
            federation.log_path(f"node-{i}").read_text()[start:]
            for i, start in enumerate(node_logs_before)
        ],
    }


def test_killed_serverapp_resumes_from_its_checkpoint(server_crash_drill):
    drill = server_crash_drill
    assert drill["status"] == "finished:completed", drill["logs"]
    assert drill["checkpoint_round"] >= 2
    assert f"Resuming from round {drill['checkpoint_round']}" in drill["logs"]
    rounds = drill["results"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert drill["results"]["resumed_at_round"] == [drill["checkpoint_round"]]
    assert all(r["replies"] == NUM_NODES and not r["skipped"] for r in rounds), rounds
    # The resumed run is a new Flower run: every node found its duals again on disk.
    assert all("Restored client state of run" in log for log in drill["node_logs"]), drill["node_logs"]


def test_supernode_with_unregistered_key_is_refused(federation):
    intruder = federation.add_node(NUM_NODES, NUM_NODES, register=False)
    member = f"node-{intruder.index}"
    federation.start_node(intruder.index, wait=False)
    log = federation.log_path(member)
    wait_for(lambda: "Failed to activate SuperNode" in log.read_text(), 90,
             "the SuperLink to refuse the unregistered node")
    assert "No SuperNode found with the given public key" in federation.log_path("superlink").read_text()
    assert federation.node_id(intruder.index) is None
    assert len(federation.online_node_ids()) == NUM_NODES
    if not federation.spec.grpc_fleet:
        # 1.37+ exits (Flower's code 305). 1.36 logs the same refusal, but the thread serving
        # its local Runtime API keeps the process alive until it is stopped.
        assert federation.wait_exit(member, timeout=30) != 0
        assert "Exit Code: 305" in log.read_text()
