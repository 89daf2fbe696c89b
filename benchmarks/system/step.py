"""One local step (forward, backward, optimizer step) per optimizer, on the same model and batch."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import ivon
import torch

from benchmarks.system.settings import median
from client_app.optimizers import build_optimizer
from client_app.training import minibatch_step
from task.config import parse_run_config
from task.data import DataSpec
from task.ivon_admm import IVONADMM
from task.models import build_model
from task.params import flatten
from tests.ivon_admm_reference import ReferenceIVONADMM

STEP_OPTIMIZERS = ("sgd", "adam", "ivon", "ivon-admm-unfused", "ivon-admm")
NUM_EXAMPLES = 1000  # the client's N: ess = N / (temperature rho) with temperature = rho = 1


def build_step_case(kind: str, input_shape: tuple[int, ...], batch: int, optimizer: str):
    """(model, optimizer, x, y) for one cell of the step-time table; the same model and batch for
    every optimizer (same seed)."""
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
        cls = IVONADMM if optimizer == "ivon-admm" else ReferenceIVONADMM
        opt = cls(params, lr=cfg.lr, ess=NUM_EXAMPLES, hess_init=cfg.hess_init, beta2=cfg.beta2)
        # As in a BayesADMM round after the first: a received global (per-coordinate precision)
        # as the prior, and nonzero duals.
        size = sum(p.numel() for p in params)
        mean = flatten(params)
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
