"""Defaults (no tuning): every strategy/optimizer combination the run config accepts, with no key
set but the method's own (`strategy`, `optimizer`, and `posterior` for the isotropic BayesADMM)
and the data keys of the measurement: digits, Dirichlet(0.1) label skew, 10 clients, 30 rounds.

Each run is a real federation in one process (`benchmarks.inprocess.simulate`). Every other key
keeps its default from pyproject.toml; `fraction-evaluate = 0` only skips the clients' own
evaluation of the global (it changes no training). Reported per combination, mean +- std over the
seeds: server test accuracy at rounds 10, 20 and 30, the first round at >= 90% per seed, the
final NLL, and for BayesADMM the final NLL of the Bayesian model average.

    python benchmarks/defaults.py --jobs 2      # the full measurement (3 seeds, 30 rounds)
    python benchmarks/defaults.py --quick       # smoke run: 1 seed, 2 rounds

Writes defaults.md and defaults.json to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_jobs, add_seeds_and_rounds, benchmark_parser, command_line, machine, mean_std,
    save_report, start_worker,
)

NUM_NODES = 10
TARGET = 0.90
DATA = {"dataset": "digits", "partitioner": "dirichlet", "dirichlet-alpha": 0.1}

# Every combination the run config accepts, with only the keys that choose it.
COMBINATIONS: dict[str, dict[str, Any]] = {
    "fedavg+sgd": {"strategy": "fedavg", "optimizer": "sgd"},
    "fedavg+ivon": {"strategy": "fedavg", "optimizer": "ivon"},
    "fedpa+sgd": {"strategy": "fedpa", "optimizer": "sgd"},
    "fedpa+ivon": {"strategy": "fedpa", "optimizer": "ivon"},
    "bayes-admm+ivon": {"strategy": "bayes-admm", "optimizer": "ivon"},
    "bayes-admm+sgd (isotropic)": {
        "strategy": "bayes-admm", "optimizer": "sgd", "posterior": "isotropic",
    },
}
QUICK = {"rounds": 2, "seeds": [0], "mc": 4}
FULL = {"rounds": 30, "seeds": [0, 1, 2], "mc": None}


def report_rounds(num_rounds: int) -> list[int]:
    return sorted({r for r in (10, 20, 30) if r <= num_rounds} | {num_rounds})


def overrides(combination: str, seed: int, rounds: int, mc: int | None) -> dict[str, Any]:
    keys = {**COMBINATIONS[combination], **DATA, "num-server-rounds": rounds, "seed": seed,
            "fraction-evaluate": 0.0}
    if mc is not None:
        keys["eval-mc-samples"] = mc
    return keys


def _run(job: tuple[str, int, dict]) -> dict:
    """One federation (in a worker process); returns its per-round server metrics."""
    start_worker()
    from benchmarks.inprocess import simulate

    combination, seed, keys = job
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        outputs = simulate({**keys, "output-dir": folder}, NUM_NODES)
    wanted = ("accuracy", "nll", "bma_accuracy", "bma_nll")
    rounds = [
        {"round": r["round"], **{k: float(r[k]) for k in wanted if k in r}}
        for r in outputs.results["rounds"]
    ]
    return {"combination": combination, "seed": seed, "overrides": keys,
            "seconds": time.perf_counter() - started, "rounds": rounds}


def first_round_at(rounds: list[dict], target: float = TARGET) -> int | None:
    return next((r["round"] for r in rounds if r["accuracy"] >= target), None)


def summarize(runs: list[dict], at: list[int]) -> dict[str, Any]:
    def at_round(run: dict, key: str, r: int) -> float:
        return next((x[key] for x in run["rounds"] if x["round"] == r and key in x), math.nan)

    last = runs[0]["rounds"][-1]["round"]
    summary: dict[str, Any] = {
        "accuracy": {str(r): mean_std([at_round(run, "accuracy", r) for run in runs]) for r in at},
        "first_round_at_target": [first_round_at(run["rounds"]) for run in runs],
        "nll": mean_std([at_round(run, "nll", last) for run in runs]),
    }
    if "bma_nll" in runs[0]["rounds"][-1]:
        summary["bma_nll"] = mean_std([at_round(run, "bma_nll", last) for run in runs])
    return summary


def markdown_table(summary: dict[str, dict], at: list[int], seeds: list[int]) -> str:
    last = at[-1]
    head = (["combination"] + [f"acc % @{r}" for r in at]
            + [f"first round >= {TARGET:.0%} (per seed)", f"NLL @{last}", f"BMA NLL @{last}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for combination, s in summary.items():
        cells = [combination]
        for r in at:
            accuracy = s["accuracy"][str(r)]
            cells.append(f"{accuracy['mean'] * 100:.1f} ± {accuracy['std'] * 100:.1f}")
        cells.append(", ".join("–" if r is None else str(r) for r in s["first_round_at_target"]))
        cells.append(f"{s['nll']['mean']:.3f} ± {s['nll']['std']:.3f}")
        bma = s.get("bma_nll")
        cells.append("–" if bma is None else f"{bma['mean']:.3f} ± {bma['std']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nSeeds {seeds}; '–': not reached."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "smoke run: 1 seed, 2 rounds")
    parser.add_argument("--combinations", nargs="+", choices=list(COMBINATIONS),
                        default=list(COMBINATIONS))
    add_seeds_and_rounds(parser)
    add_jobs(parser)
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    args.seeds = args.seeds if args.seeds is not None else defaults["seeds"]
    args.rounds = args.rounds or defaults["rounds"]
    args.mc = defaults["mc"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the worker processes
    started = time.perf_counter()
    jobs = [(c, seed, overrides(c, seed, args.rounds, args.mc))
            for c in args.combinations for seed in args.seeds]
    print(f"{len(jobs)} federations ({len(args.combinations)} combinations x {len(args.seeds)} "
          f"seeds, {args.rounds} rounds), {args.jobs} at once", flush=True)
    runs = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for run in pool.map(_run, jobs):
            last = run["rounds"][-1]
            bma = f" bma nll {last['bma_nll']:.4f}" if "bma_nll" in last else ""
            print(f"  {run['combination']:27s} seed {run['seed']}: acc {last['accuracy']:.4f} "
                  f"nll {last['nll']:.4f}{bma} first>=90% {first_round_at(run['rounds'])} "
                  f"({run['seconds']:.0f} s)", flush=True)
            runs.append(run)
    at = report_rounds(args.rounds)
    summary = {c: summarize([r for r in runs if r["combination"] == c], at)
               for c in args.combinations}
    results = {
        "command": command_line("defaults.py", argv), "data": DATA, "num_nodes": NUM_NODES, "rounds": args.rounds,
        "seeds": args.seeds, "machine": machine(), "wall_seconds": time.perf_counter() - started,
        "summary": summary, "runs": runs,
    }
    text = (f"# Defaults (no tuning)\n\n`{results['command']}`: digits, Dirichlet(0.1), "
            f"{NUM_NODES} clients, {args.rounds} rounds; wall time "
            f"{results['wall_seconds'] / 60:.1f} min on {results['machine']}.\n\n"
            + markdown_table(summary, at, args.seeds) + "\n")
    save_report(args.out, "defaults", text, json.dumps(results, separators=(",", ":")))
    print(f"Wrote {args.out / 'defaults.md'} and defaults.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
