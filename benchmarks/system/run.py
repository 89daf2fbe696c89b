"""The command line: `python -m benchmarks.system [--quick] [--sections ...] [--threads N]`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import benchmarks.system
from benchmarks.system.aggregation import bench_aggregation
from benchmarks.system.report import bytes_table, machine, markdown, summarize_rounds
from benchmarks.system.rounds import bench_rounds
from benchmarks.system.settings import FULL, QUICK, ROOT, SECTIONS
from benchmarks.system.step import bench_step_time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.system", description=benchmarks.system.__doc__.split("\n\n")[0]
    )
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

