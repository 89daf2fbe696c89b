"""System costs: local step time per optimizer, server aggregation time and memory, the split of
a round into local compute and everything else, and bytes per round.

    python benchmarks/system.py                                            # everything (~30 min)
    python benchmarks/system.py --quick --out /tmp/system-quick           # smoke run (< 2 min)
    python benchmarks/system.py --sections step,aggregation --threads 1   # some tables only

Writes `<out>/system.json` (every table: a list of rows, plus the machine) and `<out>/system.md`
(the same tables in Markdown). Tables:

- `step_time`: one local step (`client_app.training.minibatch_step`: forward, backward, optimizer
  step) of SGD, Adam, stock `ivon.IVON`, our IVON-ADMM before the hot-path rewrite
  (`UnfusedIVONADMM`) and `task.ivon_admm.IVONADMM` with a prior and duals set, on the same model
  and batch. The optimizers run interleaved in rotating order, block after block; the table holds
  the median step time and the median over blocks of the ratio to Adam (and SGD) of the same block.
- `aggregation`: `aggregate_train` of a real strategy object on K replies of P parameters (the
  check of the replies, their conversion and the server math), its time, and its working memory:
  the tracemalloc peak of the call, i.e. what it allocates beyond the replies it was handed.
  The replies share a few distinct arrays, so that K = 1000 fits in memory; the work is the same.
- `round_split`: a federation of the real ServerApp loop and ClientApp handlers in this process
  (`benchmarks.inprocess`), with the local training (`train_epochs`) of every client, the client
  handlers, the aggregation and the server's evaluation timed inside each round.
- `simulation`: the same runs through `flwr run` (Ray simulation engine, local SuperLink); the
  round seconds there minus the local compute measured in process is everything else.
- `flower_floor`: rounds of a no-op Flower app (`benchmarks/flower_floor`: the same nodes, the
  same model-sized messages, clients that only echo) through `flwr run`: Flower's own cost.
- `deployment`: the same through the loopback deployment (`scripts/launch_federation.py`), when
  that launcher is in this checkout.
- `bytes`: bytes down and up per round per strategy, from the runs' results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ivon  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

SECTIONS = ("step", "aggregation", "rounds", "simulation", "deployment")

# ------------------------------------------------------------------------------------ settings

FULL: dict[str, Any] = {
    "step_cases": [
        ("mlp 784-200-100-10", "mlp", (1, 28, 28), 64),
        ("mlp 784-200-100-10", "mlp", (1, 28, 28), 256),
        ("mlp 64-200-100-10 (digits)", "mlp", (1, 8, 8), 32),
        ("cnn 1x28x28", "cnn", (1, 28, 28), 64),
        ("cnn 3x32x32", "cnn", (3, 32, 32), 64),
    ],
    "step_blocks": 9,
    "step_block_seconds": 0.4,
    "agg_strategies": ("fedavg", "bayes-admm"),
    "agg_clients": (10, 100, 1000),
    "agg_params": (10_000, 1_000_000),
    "agg_repeats": 5,
    "agg_memory_budget_gb": 5.0,
    # (label, run-config overrides, strategies): the MLP of the e2e tests, and a CNN whose local
    # compute per round is some 50 times larger, to show which costs are fixed per message.
    "round_workloads": [
        ("digits mlp", {"model": "mlp"}, ("fedavg", "fedpa", "bayes-admm")),
        ("digits cnn", {"model": "cnn"}, ("fedavg", "bayes-admm")),
    ],
    "round_nodes": 10,
    "round_rounds": 4,
    "round_repeats": 2,
}
QUICK: dict[str, Any] = {
    "step_cases": [
        ("mlp 784-200-100-10", "mlp", (1, 28, 28), 64),
        ("mlp 64-200-100-10 (digits)", "mlp", (1, 8, 8), 32),
    ],
    "step_blocks": 3,
    "step_block_seconds": 0.1,
    "agg_strategies": ("fedavg", "bayes-admm"),
    "agg_clients": (10, 100),
    "agg_params": (10_000,),
    "agg_repeats": 2,
    "agg_memory_budget_gb": 0.5,
    "round_workloads": [("digits mlp", {"model": "mlp"}, ("fedavg", "fedpa", "bayes-admm"))],
    "round_nodes": 4,
    "round_rounds": 2,
    "round_repeats": 1,
}

# Each strategy as the e2e tests run it: settings under which every method does its own thing.
STRATEGY_SETTINGS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedpa": {"burnin-rounds": 1, "local-epochs": 3, "local-burnin-epochs": 1},
    "bayes-admm": {
        "optimizer": "ivon", "local-epochs": 2, "lr": 0.0005, "temperature": 0.001,
        "hess-init": 0.001, "dual-damping": 0.001, "eval-mc-samples": 8,
    },
}
ROUND_BASE = {"dataset": "digits", "partitioner": "dirichlet", "dirichlet-alpha": 0.5, "seed": 0}


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


# ==================================================================================== step time


class UnfusedIVONADMM(ivon.IVON):
    """IVON-ADMM as it was before the hot-path rewrite (commit 3118c08): stock IVON's sampling,
    restoring and gradient collection, and an `_update` that allocates every intermediate.

    Kept only to measure the rewrite against, in the same run; tests use it as a bitwise reference
    for the prior and dual terms. Accessors: `set_prior` and `set_duals` as in IVONADMM.
    """

    def __init__(self, params, lr: float, ess: float, rescale_lr: bool = False, **kwargs):
        super().__init__(params, lr=lr, ess=ess, rescale_lr=rescale_lr, **kwargs)
        for group in self.param_groups:
            zeros = torch.zeros(group["numel"], device=self._device, dtype=self._dtype)
            group["prior_mean"], group["dual_mean"], group["dual_precision"] = (
                zeros, zeros.clone(), zeros.clone()
            )

    def _split(self, flat):
        flat = torch.as_tensor(flat, device=self._device, dtype=self._dtype).flatten().clone()
        return flat.split([group["numel"] for group in self.param_groups])

    def set_prior(self, mean, precision) -> None:
        scalar = torch.as_tensor(precision).dim() == 0
        precisions = (
            (float(precision),) * len(self.param_groups) if scalar else self._split(precision)
        )
        for group, group_mean, group_precision in zip(self.param_groups, self._split(mean), precisions):
            group["prior_mean"] = group_mean
            group["weight_decay"] = group_precision / group["ess"]

    def set_duals(self, dual_mean, dual_precision, num_examples: int, temperature: float) -> None:
        scale = temperature / num_examples
        for group, dm, dp in zip(self.param_groups, self._split(dual_mean), self._split(dual_precision)):
            group["dual_mean"], group["dual_precision"] = scale * dm, scale * dp

    def _update(self):
        self.current_step += 1
        offset = 0
        for group in self.param_groups:
            group_slice = slice(offset, offset + group["numel"])
            offset += group["numel"]
            mean = torch.cat([p.flatten() for p in group["params"] if p is not None])
            wd, beta2 = group["weight_decay"], group["beta2"]
            group["momentum"] = self._new_momentum(
                self.state["avg_grad"][group_slice], group["momentum"], group["beta1"]
            )
            hess = group["hess"]
            data_hess = self._get_nll_hess(
                self.hess_approx, hess + wd, self.state["avg_nxg"], self.state["avg_gsq"], group_slice
            )
            hess_sample = data_hess * group["ess"] + group["dual_precision"]
            hess = (
                beta2 * hess
                + (1.0 - beta2) * hess_sample
                + (0.5 * (1 - beta2) ** 2) * (hess - hess_sample).square() / (hess + wd)
            )
            group["hess"] = hess
            debias = 1.0 - math.pow(group["beta1"], float(self.current_step)) if self.debias else 1.0
            lr = group["lr"] * (group["hess_init"] + wd) if self.rescale_lr else group["lr"]
            gradient = (
                group["momentum"] / debias
                + wd * (mean - group["prior_mean"])
                + group["dual_precision"] * mean
                - group["dual_mean"]
            )
            radius = group["clip_radius"]
            mean = mean - lr * torch.clip(gradient / (hess + wd), min=-radius, max=radius)
            pg_offset = 0
            for p in group["params"]:
                if p is not None:
                    p.data = mean[pg_offset : pg_offset + p.numel()].view(p.shape)
                    pg_offset += p.numel()


STEP_OPTIMIZERS = ("sgd", "adam", "ivon", "ivon-admm-unfused", "ivon-admm")
NUM_EXAMPLES = 1000  # the client's N: ess = N / (temperature rho) with temperature = rho = 1


def build_step_case(kind: str, input_shape: tuple[int, ...], batch: int, optimizer: str):
    """(model, optimizer, x, y) for one cell of the step-time table; the same model and batch for
    every optimizer (same seed)."""
    from client_app.optimizers import build_optimizer
    from task.config import parse_run_config
    from task.data import DataSpec
    from task.ivon_admm import IVONADMM
    from task.models import build_model

    cfg = parse_run_config({"model": kind, "optimizer": "ivon" if "ivon" in optimizer else "sgd",
                            "lr": 1e-3, "beta2": 0.9998, "seed": 0})
    model = build_model(cfg, DataSpec(input_shape, 10))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((batch, *input_shape), generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    params = list(model.parameters())
    if optimizer == "sgd":
        opt = build_optimizer(cfg, params, cfg.lr, NUM_EXAMPLES)  # SGD, momentum 0.9
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr)  # PyTorch's default implementation for CPU
    elif optimizer == "ivon":
        opt = ivon.IVON(params, lr=cfg.lr, ess=NUM_EXAMPLES, hess_init=cfg.hess_init,
                        beta2=cfg.beta2, weight_decay=cfg.prior_precision / NUM_EXAMPLES,
                        rescale_lr=False)
    else:
        cls = IVONADMM if optimizer == "ivon-admm" else UnfusedIVONADMM
        opt = cls(params, lr=cfg.lr, ess=NUM_EXAMPLES, hess_init=cfg.hess_init, beta2=cfg.beta2)
        # As in a BayesADMM round after the first: a received global (per-coordinate precision)
        # as the prior, and nonzero duals.
        size = sum(p.numel() for p in params)
        mean = torch.cat([p.detach().flatten() for p in params])
        g = torch.Generator().manual_seed(2)
        opt.set_prior(mean + 0.01 * torch.randn(size, generator=g), 1.0 + torch.rand(size, generator=g))
        opt.set_duals(0.01 * torch.randn(size, generator=g), 0.1 * torch.rand(size, generator=g),
                      NUM_EXAMPLES, 1.0)
    return model, opt, x, y


# Parts of a step, timed in the same blocks as the optimizers: the forward and backward pass
# alone, and the draw of P standard normals (IVON's weight noise, torch's CPU generator); their
# sum is the least an IVON step can cost, whatever its update does.
STEP_PARTS = ("forward-backward", "noise-draw")


def _step_function(name: str, cases: dict[str, tuple]) -> Callable[[], None]:
    from client_app.training import minibatch_step

    if name in cases:
        model, opt, x, y = cases[name]
        return lambda: minibatch_step(model, opt, x, y)
    model, _, x, y = cases["sgd"]
    if name == "forward-backward":
        def forward_backward() -> None:
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()

        return forward_backward
    noise = torch.empty(sum(p.numel() for p in model.parameters()))
    return lambda: torch.randn(noise.numel(), out=noise)


def bench_step_time(settings: dict[str, Any], log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    timed = STEP_OPTIMIZERS + STEP_PARTS
    for label, kind, input_shape, batch in settings["step_cases"]:
        cases = {name: build_step_case(kind, input_shape, batch, name) for name in STEP_OPTIMIZERS}
        num_params = sum(p.numel() for p in cases["sgd"][0].parameters())
        functions = {name: _step_function(name, cases) for name in timed}

        def run(name: str, steps: int) -> tuple[float, float]:
            """(wall, CPU) seconds per step; the CPU time of this process counts every thread."""
            step = functions[name]
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step()
            return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps

        for name in timed:  # warm-up (allocator, first-touch pages, lazy init)
            run(name, 3)
        # Steps per block from the slowest optimizer, so that each block lasts about as set.
        probe = max(run(name, 2)[0] for name in STEP_OPTIMIZERS)
        steps = max(3, int(settings["step_block_seconds"] / probe))
        wall: dict[str, list[float]] = {name: [] for name in timed}
        cpu: dict[str, list[float]] = {name: [] for name in timed}
        for block in range(settings["step_blocks"]):
            shift = block % len(timed)  # rotate the order, block after block
            for name in timed[shift:] + timed[:shift]:
                block_wall, block_cpu = run(name, steps)
                wall[name].append(block_wall)
                cpu[name].append(block_cpu)
        for times in (wall, cpu):  # the floor of an IVON step, block by block
            times["ivon-floor"] = [f + n for f, n in zip(times["forward-backward"], times["noise-draw"])]

        def ratio(times: dict[str, list[float]], name: str, base: str) -> float:
            return median(t / b for t, b in zip(times[name], times[base]))

        for name in STEP_OPTIMIZERS:
            model = cases[name][0]
            assert all(torch.isfinite(p).all() for p in model.parameters()), (label, name)
        for name in (*timed, "ivon-floor"):
            rows.append({
                "model": label, "params": num_params, "batch": batch, "optimizer": name,
                "step_ms": 1e3 * median(wall[name]),
                "vs_adam": ratio(wall, name, "adam"), "vs_sgd": ratio(wall, name, "sgd"),
                "cpu_step_ms": 1e3 * median(cpu[name]),
                "cpu_vs_adam": ratio(cpu, name, "adam"), "cpu_vs_sgd": ratio(cpu, name, "sgd"),
                "blocks": settings["step_blocks"], "steps_per_block": steps,
            })
        summary = ", ".join(
            f"{r['optimizer']} {r['step_ms']:.2f} ms ({r['vs_adam']:.2f}x adam, "
            f"CPU {r['cpu_vs_adam']:.2f}x)"
            for r in rows[-len(timed) - 1:]
        )
        log(f"step {label} batch {batch} (P={num_params}): {summary}")
        del cases, functions
        gc.collect()
    return rows


# ==================================================================================== aggregation


def _set_task_identity() -> None:
    from benchmarks.inprocess import _set_task_identity as set_identity

    set_identity()


def _aggregation_case(strategy_name: str, num_clients: int, num_params: int, distinct: int = 4):
    """A fresh strategy after configure_train for K nodes, and K valid replies to it."""
    from strategies import STRATEGIES, records
    from task.config import parse_run_config
    from task.params import numpy_to_record

    cfg = parse_run_config({
        "strategy": strategy_name, "optimizer": "ivon" if strategy_name == "bayes-admm" else "sgd",
        "min-train-nodes": 1, "fraction-train": 1.0,
    })
    # Two tensors, as a layer's weight and bias.
    shapes = {"weight": (num_params - 10,), "bias": (10,)}
    rng = np.random.default_rng(0)
    initial = numpy_to_record({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()})
    strategy = STRATEGIES[strategy_name](cfg, initial)
    from benchmarks.inprocess import NodeListGrid

    grid = NodeListGrid(range(1, num_clients + 1))
    messages = list(strategy.configure_train(1, initial, ConfigRecord({records.STATE_KEY: "b"}), grid))
    contents = []
    for index in range(min(distinct, num_clients)):
        content = RecordDict({
            records.ARRAYS: numpy_to_record(
                {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
            ),
            records.METRICS: MetricRecord({records.NUM_EXAMPLES: 100 + index}),
        })
        if strategy_name == "bayes-admm":
            content[records.PRECISION] = numpy_to_record(
                {k: (1.0 + rng.random(size=s)).astype(np.float32) for k, s in shapes.items()}
            )
        contents.append(content)
    replies = [Message(contents[i % len(contents)], reply_to=m) for i, m in enumerate(messages)]
    return strategy, replies


def _working_memory(call: Callable[[], Any]) -> tuple[float, Any]:
    """Peak bytes allocated during `call()` beyond what existed before it (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return float(peak), result


def bench_aggregation(settings: dict[str, Any], log: Callable[[str], None]) -> list[dict[str, Any]]:
    _set_task_identity()
    rows = []
    budget = settings["agg_memory_budget_gb"] * 1e9
    for strategy_name in settings["agg_strategies"]:
        for num_params in settings["agg_params"]:
            per_client: float | None = None  # working bytes per reply, from the last K measured
            for num_clients in settings["agg_clients"]:
                row: dict[str, Any] = {"strategy": strategy_name, "clients": num_clients,
                                       "params": num_params}
                if per_client is not None and per_client * num_clients > budget:
                    row |= {"status": f"skipped: needs ~{per_client * num_clients / 1e9:.0f} GB "
                                      f"of working memory (budget {budget / 1e9:.1f} GB)",
                            "predicted_working_mb": per_client * num_clients / 1e6}
                    rows.append(row)
                    log(f"aggregation {strategy_name} K={num_clients} P={num_params}: {row['status']}")
                    continue
                seconds: list[float] = []
                while len(seconds) < settings["agg_repeats"] and sum(seconds) < 20.0:
                    strategy, replies = _aggregation_case(strategy_name, num_clients, num_params)
                    gc.collect()
                    started = time.perf_counter()
                    arrays, _ = strategy.aggregate_train(1, replies)
                    seconds.append(time.perf_counter() - started)
                    assert arrays is not None, strategy.last_round
                    del strategy, replies, arrays
                strategy, replies = _aggregation_case(strategy_name, num_clients, num_params)
                input_bytes = sum(
                    int(r.count_bytes()) for content in {id(m.content): m.content for m in replies}.values()
                    for r in content.array_records.values()
                )
                peak, _ = _working_memory(lambda: strategy.aggregate_train(1, replies))
                del strategy, replies
                per_client = peak / num_clients
                row |= {"status": "ok", "seconds": median(seconds),
                        "working_mb": peak / 1e6, "working_mb_per_client": per_client / 1e6,
                        "working_per_model_size": peak / (4 * num_params),
                        "distinct_reply_mb": input_bytes / 1e6}
                rows.append(row)
                log(f"aggregation {strategy_name} K={num_clients} P={num_params}: "
                    f"{row['seconds'] * 1e3:.1f} ms, working memory {row['working_mb']:.1f} MB "
                    f"({row['working_per_model_size']:.1f} x the float32 model)")
    return rows


# ==================================================================================== rounds


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
    import client_app.bayes_admm
    import client_app.fedavg
    import client_app.fedpa
    import server_app.app as server
    from benchmarks.inprocess import InProcessGrid, default_run_config
    from server_app.outputs import RunOutputs
    from strategies import STRATEGIES
    from task.config import parse_run_config

    _set_task_identity()
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
        for module in (client_app.fedavg, client_app.fedpa, client_app.bayes_admm):
            stack.enter_context(_patched(module, "train_epochs", timers.timed("local_training", module.train_epochs)))
        for name in ("evaluate_mean", "evaluate_bma"):
            stack.enter_context(_patched(server, name, timers.timed("server_evaluation", getattr(server, name))))
        # Written after each round's `seconds` is taken: results.json and the checkpoint.
        stack.enter_context(_patched(server, "save_checkpoint", timers.timed("persist", server.save_checkpoint)))
        stack.enter_context(_patched(RunOutputs, "add_round", timers.timed("persist", RunOutputs.add_round)))
        stack.enter_context(_patched(strategy_cls, "aggregate_train",
                                     timers.timed("aggregation", strategy_cls.aggregate_train)))
        configure = timers.timed("configure", strategy_cls.configure_train)

        def configure_train(self, server_round, *args, **kwargs):
            timers.current = server_round  # the round's timers start with its configure step
            return configure(self, server_round, *args, **kwargs)

        stack.enter_context(_patched(strategy_cls, "configure_train", configure_train))
        outputs = server.run(TimedGrid(run_config, num_nodes), cfg)
    return outputs.results, timers.rounds


def split_row(label: dict[str, Any], mode: str, entry: dict, timers: dict | None,
              local_training: float) -> dict[str, Any]:
    """One round: its seconds, the local training in it, and everything else."""
    seconds = entry["seconds"]
    row = {**label, "mode": mode, "round": entry["round"], "clients": entry["sampled"],
           "round_seconds": seconds, "local_training_seconds": local_training,
           "everything_else_seconds": seconds - local_training,
           "everything_else_vs_local": (seconds - local_training) / local_training,
           "bytes_down": entry["bytes_down"], "bytes_up": entry["bytes_up"]}
    if timers is not None:
        client_total = timers.get("client_train", 0.0) + timers.get("client_evaluate", 0.0)
        parts = {
            "client_handler_other_seconds": client_total - local_training,
            "server_evaluation_seconds": timers.get("server_evaluation", 0.0),
            "aggregation_seconds": timers.get("aggregation", 0.0),
            "configure_seconds": timers.get("configure", 0.0),
        }
        parts["loop_other_seconds"] = seconds - local_training - sum(parts.values())
        # Not in the round's seconds: written after them, once per round.
        parts["persist_seconds"] = timers.get("persist", 0.0)
        row |= parts
    return row


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
                overrides = {**ROUND_BASE, **STRATEGY_SETTINGS[strategy], **workload_overrides,
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
                    _flwr_run(ROOT, {**overrides, "output-dir": str(folder)}, nodes, threads, tag)
                    sim = json.loads((folder / "results.json").read_text())
                    for entry in sim["rounds"]:
                        rows["simulation"].append(
                            split_row(label, "simulation", entry, None, local[entry["round"]])
                        )
                    log(f"flwr run {workload} {strategy} #{repeat}: round "
                        f"{rows['simulation'][-1]['round_seconds']:.2f} s")

                if deployment:
                    rows["deployment"] += _deployment_rows(
                        launcher, label, overrides, nodes, local, out / "runs" / f"{tag}-deployment",
                        threads, log,
                    )
            if simulation:
                rows["flower_floor"] += _flower_floor_rows(
                    workload, workload_overrides, nodes, rounds, threads, out, repeat, log
                )
    return rows


FLOWER_FLOOR_APP = ROOT / "benchmarks" / "flower_floor"


def _flwr_run(app_dir: Path, run_config: dict[str, Any], nodes: int, threads: int, tag: str) -> None:
    """`flwr run` of the app in `app_dir` on a private local SuperLink, to finished:completed."""
    from tests.flower_runs import LocalFederation

    with tempfile.TemporaryDirectory() as home:
        federation = LocalFederation(Path(home), app_dir)
        federation.env["OMP_NUM_THREADS"] = str(threads)
        try:
            run = federation.run(_run_config_string(run_config), nodes)
        finally:
            federation.stop()
    if run.status != "finished:completed":
        raise RuntimeError(f"flwr run {tag}: {run.status}\n{run.logs[-3000:]}")


def _flower_floor_rows(workload: str, workload_overrides: dict[str, Any], nodes: int, rounds: int,
                       threads: int, out: Path, repeat: int,
                       log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rounds of the no-op app (benchmarks/flower_floor) moving this workload's model: what a
    round costs in Flower's simulation with nothing of ours in it."""
    from benchmarks.inprocess import default_run_config
    from task.config import parse_run_config
    from task.data import data_spec
    from task.models import build_model

    cfg = parse_run_config({**default_run_config(), **ROUND_BASE, **workload_overrides})
    num_params = sum(p.numel() for p in build_model(cfg, data_spec(cfg)).parameters())
    output = out / "runs" / f"flower-floor-{workload.replace(' ', '-')}-{repeat}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    _flwr_run(FLOWER_FLOOR_APP, {"num-server-rounds": rounds, "num-params": num_params,
                                 "output": str(output)}, nodes, threads, f"flower-floor {workload}")
    floor = json.loads(output.read_text())["rounds"]
    log(f"flwr run of the no-op app ({workload}, P={num_params}): round {floor[-1]['seconds']:.2f} s")
    return [{"workload": workload, "strategy": "no-op app", "mode": "simulation", "repeat": repeat,
             "params": num_params,
             "clients": nodes, "round": r["round"], "round_seconds": r["seconds"]} for r in floor]


def _run_config_string(overrides: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return f"'{v}'" if isinstance(v, str) else repr(v)

    return " ".join(f"{k}={value(v)}" for k, v in overrides.items())


def _deployment_rows(launcher: Path, label: dict[str, Any], overrides: dict, nodes: int,
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
                 _run_config_string({**overrides, "output-dir": str(folder)})],
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


def summarize_rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy and mode: medians over the rounds after the first (round 1 warms caches)."""
    keys = ["round_seconds", "local_training_seconds", "everything_else_seconds",
            "everything_else_vs_local", "client_handler_other_seconds", "server_evaluation_seconds",
            "aggregation_seconds", "configure_seconds", "loop_other_seconds", "persist_seconds"]
    out = []
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        if "round_seconds" in row:
            groups.setdefault((row["workload"], row["strategy"], row["mode"]), []).append(row)
    for (workload, strategy, mode), group in groups.items():
        later = [r for r in group if r["round"] > 1] or group
        summary = {"workload": workload, "strategy": strategy, "mode": mode, "rounds": len(later)}
        for key in keys:
            if all(key in r for r in later):
                summary[key] = median(r[key] for r in later)
        summary["first_round_seconds"] = median(r["round_seconds"] for r in group if r["round"] == 1)
        out.append(summary)
    return out


def bytes_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bytes per training round per strategy (the in-process runs; the wire payload is the same)."""
    table = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        fedavg = None
        for strategy in ("fedavg", "fedpa", "bayes-admm"):
            mine = [r for r in rows if r["workload"] == workload and r["strategy"] == strategy
                    and r["mode"] == "in-process"]
            if not mine:
                continue
            down, up = median(r["bytes_down"] for r in mine), median(r["bytes_up"] for r in mine)
            if strategy == "fedavg":
                fedavg = down + up
            table.append({"workload": workload, "strategy": strategy, "clients": mine[0].get("clients"),
                          "bytes_down": down, "bytes_up": up,
                          "vs_fedavg": (down + up) / fedavg if fedavg else float("nan")})
    return table


# ==================================================================================== output


def machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import flwr

    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": threads,
        "torch": torch.__version__, "flwr": flwr.__version__, "numpy": np.__version__,
        "ivon_opt": getattr(ivon, "__version__", "0.1.3" if hasattr(ivon, "IVON") else "?"),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def markdown(tables: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
        return str(value)

    lines = [f"Machine: {json.dumps(tables['machine'])}", ""]
    for name, rows in tables.items():
        if name == "machine" or not rows:
            continue
        columns = list(dict.fromkeys(k for row in rows for k in row))
        lines += [f"### {name}", "", "| " + " | ".join(columns) + " |",
                  "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "system-benchmark")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and "
                        "OMP_NUM_THREADS of the flwr processes)")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; "
                             "--quick leaves out simulation and deployment)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # the Flower apps it runs write there from other folders
    settings = QUICK if args.quick else FULL
    # --quick leaves out the real Flower runs: each takes a minute before its first round ends.
    default = [s for s in SECTIONS if not (args.quick and s in ("simulation", "deployment"))]
    sections = args.sections.split(",") if args.sections else default
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    tables: dict[str, Any] = {"machine": machine(args.threads)}
    if "step" in sections:
        tables["step_time"] = bench_step_time(settings, log)
    if "aggregation" in sections:
        tables["aggregation"] = bench_aggregation(settings, log)
    if {"rounds", "simulation", "deployment"} & set(sections):
        rounds = bench_rounds(settings, args.out, log, "simulation" in sections,
                              "deployment" in sections, args.threads)
        tables["round_split"] = rounds["round_split"]
        tables["round_summary"] = summarize_rounds(rounds["round_split"] + rounds["simulation"]
                                                   + rounds["flower_floor"] + rounds["deployment"])
        tables["bytes"] = bytes_table(rounds["round_split"])
        if "simulation" in sections:
            tables["simulation"] = rounds["simulation"]
            tables["flower_floor"] = rounds["flower_floor"]
        if "deployment" in sections:
            tables["deployment"] = rounds["deployment"]
    tables["machine"]["seconds"] = time.perf_counter() - started
    (args.out / "system.json").write_text(json.dumps(tables, indent=2))
    (args.out / "system.md").write_text(markdown(tables))
    log(f"wrote {args.out / 'system.json'} and {args.out / 'system.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
