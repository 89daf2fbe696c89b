"""Rounds of a federation in this process, each split into local training and everything else
(client handlers, aggregation, server evaluation, the loop); the same runs through real Flower
processes when asked (`real_runs`)."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import server_app.app as server
from benchmarks.inprocess import InProcessGrid, default_run_config
from benchmarks.inprocess import _set_task_identity as set_task_identity
from benchmarks.system.real_runs import deployment_rows, flower_floor_rows, flwr_run
from benchmarks.system.report import split_row
from benchmarks.system.settings import ROOT, ROUND_BASE
from server_app.outputs import RunOutputs
from server_app.uncertainty import UncertaintyEvaluation
from strategies import STRATEGIES
from task.config import parse_run_config
from task.methods import METHODS, resolve


class _Timers:
    """Seconds per round spent in the parts of a round that run in this process."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, float]] = {}
        self.current = 0

    def add(self, key: str, seconds: float) -> None:
        entry = self.rounds.setdefault(self.current, {})
        entry[key] = entry.get(key, 0.0) + seconds

    def timed(self, key: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(key, time.perf_counter() - started)

        return wrapper


@contextlib.contextmanager
def _patched(target: Any, name: str, value: Any):
    """Set target.name for the duration; an inherited class attribute is restored by deletion."""
    own = name in vars(target)
    old = vars(target)[name] if own else None
    setattr(target, name, value)
    try:
        yield
    finally:
        if own:
            setattr(target, name, old)
        else:
            delattr(target, name)


def run_in_process(overrides: dict[str, Any], num_nodes: int) -> tuple[dict, dict[int, dict]]:
    """One federation in this process with timers; returns (results.json content, timers)."""
    set_task_identity()
    timers = _Timers()

    class TimedGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.group_id.isdigit():
                timers.current = int(messages[0].metadata.group_id)
            return super().send_and_receive(messages, timeout=timeout)

        def _deliver(self, message):
            kind = message.metadata.message_type.split(".")[0]
            started = time.perf_counter()
            try:
                return super()._deliver(message)
            finally:
                timers.add(f"client_{kind}", time.perf_counter() - started)

    run_config = {**default_run_config(), **overrides}
    cfg = parse_run_config(run_config)
    strategy_cls = STRATEGIES[cfg.strategy]
    with contextlib.ExitStack() as stack:
        for module in {sys.modules[resolve(m.client).__module__] for m in METHODS.values()}:
            stack.enter_context(_patched(
                module, "train_epochs", timers.timed("local_training", module.train_epochs)
            ))
        for name in ("evaluate_mean", "evaluate_bma"):
            stack.enter_context(_patched(
                server, name, timers.timed("server_evaluation", getattr(server, name))
            ))
        stack.enter_context(_patched(UncertaintyEvaluation, "__call__", timers.timed(
            "server_evaluation", UncertaintyEvaluation.__call__
        )))
        # Written after each round's `seconds` is taken: results.json and the checkpoint.
        stack.enter_context(_patched(
            server, "save_checkpoint", timers.timed("persist", server.save_checkpoint)
        ))
        stack.enter_context(_patched(
            RunOutputs, "add_round", timers.timed("persist", RunOutputs.add_round)
        ))
        stack.enter_context(_patched(strategy_cls, "aggregate_train",
                                     timers.timed("aggregation", strategy_cls.aggregate_train)))
        configure = timers.timed("configure", strategy_cls.configure_train)

        def configure_train(self, server_round, *args, **kwargs):
            timers.current = server_round  # the round's timers start with its configure step
            return configure(self, server_round, *args, **kwargs)

        stack.enter_context(_patched(strategy_cls, "configure_train", configure_train))
        outputs = server.run(TimedGrid(run_config, num_nodes), cfg)
    return outputs.results, timers.rounds


def bench_rounds(settings: dict[str, Any], out: Path, log: Callable[[str], None],
                 simulation: bool, deployment: bool, threads: int) -> dict[str, list]:
    """In-process rounds (always), and the same runs through `flwr run` (with the no-op app's
    rounds for each workload) and the loopback deployment when asked; runs alternate between
    modes, repeat after repeat."""
    rows: dict[str, list] = {"round_split": [], "simulation": [], "deployment": [], "flower_floor": []}
    nodes, rounds = settings["round_nodes"], settings["round_rounds"]
    launcher = ROOT / "scripts" / "launch_federation.py"
    for repeat in range(settings["round_repeats"]):
        for workload, workload_overrides, strategies in settings["round_workloads"]:
            for strategy in strategies:
                overrides = {**ROUND_BASE, **METHODS[strategy].short_run, **workload_overrides,
                             "strategy": strategy, "num-server-rounds": rounds}
                tag = f"{strategy}-{workload.replace(' ', '-')}-{repeat}"
                label = {"workload": workload, "strategy": strategy, "repeat": repeat}

                folder = out / "runs" / f"{tag}-inprocess"
                shutil.rmtree(folder, ignore_errors=True)
                results, timers = run_in_process({**overrides, "output-dir": str(folder)}, nodes)
                local = {r: t.get("local_training", 0.0) for r, t in timers.items()}
                for entry in results["rounds"]:
                    rows["round_split"].append(split_row(
                        label, "in-process", entry, timers[entry["round"]], local[entry["round"]]
                    ))
                last = rows["round_split"][-1]
                log(f"in-process {workload} {strategy} #{repeat}: round {last['round_seconds']:.2f} s,"
                    f" local training {last['local_training_seconds']:.2f} s")

                if simulation:
                    folder = out / "runs" / f"{tag}-simulation"
                    shutil.rmtree(folder, ignore_errors=True)
                    flwr_run(ROOT, {**overrides, "output-dir": str(folder)}, nodes, threads, tag)
                    sim = json.loads((folder / "results.json").read_text())
                    for entry in sim["rounds"]:
                        rows["simulation"].append(
                            split_row(label, "simulation", entry, None, local[entry["round"]])
                        )
                    log(f"flwr run {workload} {strategy} #{repeat}: round "
                        f"{rows['simulation'][-1]['round_seconds']:.2f} s")

                if deployment:
                    rows["deployment"] += deployment_rows(
                        launcher, label, overrides, nodes, local, out / "runs" / f"{tag}-deployment",
                        threads, log,
                    )
            if simulation:
                rows["flower_floor"] += flower_floor_rows(
                    workload, workload_overrides, nodes, rounds, threads, out, repeat, log
                )
    return rows
