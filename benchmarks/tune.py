"""Fair tuning for the heterogeneity benchmark: every method gets the same number of candidate
settings, each run once on each tuning setting and scored on a validation split carved from the
training pool (`server-val-fraction`: no client trains on it, and the test set stays unseen);
the best candidate becomes `presets/<method>-<dataset>.toml`, which benchmarks/heterogeneity.py
then runs on every setting of that data set.

A candidate starts from the method's digits preset with the data set's keys (DATASET_KEYS: its
network, and the same local work for every method: 5 epochs of batches of 64) and changes only
the keys of its grid (GRIDS, 6 candidates each): the learning rate for every method; the server
step (plain, or server SGD with momentum) for the methods that have one, FedAvg, FedAvg-IVON and
FedPA; for BayesADMM also its penalty rho, two weight samples per step and the temperature; rho
for classic ADMM. Score: the validation accuracy averaged over the last 3 rounds and over the
two tuning settings (ties: lower NLL): MNIST-1D with 2 classes per node on 10 nodes that all
train every round, and on 100 nodes of which 10 train a round, the two participation regimes the
benchmark runs (a rate tuned on the first alone diverged on the second). The horizon is half the
benchmark's 100 rounds: at 10 rounds a server momentum buffer has not built up, and a short
horizon favours the methods that start fast (docs/BENCHMARKS.md, "The server step").

    python benchmarks/tune.py --jobs 2              # MNIST-1D 2-classes, 10 and 100 nodes
    python benchmarks/tune.py --rounds 15 --jobs 2  # shorter
    python benchmarks/tune.py --quick --out /tmp/t  # smoke run: 2 rounds, 1,000 signals

Writes tuning.md and tuning.json (every candidate's score) to --out (default
benchmarks/results) and the chosen presets to --presets (default presets/; --quick: --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import product
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_jobs, benchmark_parser, command_line, machine, save_report,
)
from benchmarks.heterogeneity import (  # noqa: E402
    METHODS, SETTINGS, WINDOW, _run, method_config, window_mean,
)

TUNING_SETTINGS = ("mnist1d-patho2", "mnist1d-patho2-k100")
PRESET_SETTING = TUNING_SETTINGS[0]  # the data keys a preset carries (a 10-node run config)
DATASET = SETTINGS[PRESET_SETTING]["dataset"]
SEED = 100  # not one of the benchmark's seeds (0, 1, 2)
VAL_FRACTION = 0.1
ROUNDS = 50
# The network each tuned data set needs, and one local budget for every method: BayesADMM's
# digits preset takes 10 epochs where the others take 5, and batches of 64 bring the benchmark's
# full size within 90 minutes on two cores (docs/BENCHMARKS.md, "What the full size costs").
DATASET_KEYS = {"mnist1d": {"model": "cnn1d", "local-epochs": 5, "batch-size": 64}}
# The same number of candidates for every method (GRID_SIZE). The methods with a server step get
# the plain one and FedPA's reference server SGD (spec, section 4), each at three client rates.
# FedAvg's IVON client takes IVON's recipe for networks (a large initial Hessian that beta2 near 1
# keeps, with rates near SGD's); the small rates at hess-init 1e-3 of the digits presets do not
# train this CNN (docs/BENCHMARKS.md, "IVON's two regimes"). Where a winner sat at its grid's
# edge, that grid was moved one step out and the tuning run again, for every method alike, until
# each winner sat inside its grid or next to a value that lost on both settings in an earlier
# pass (docs/BENCHMARKS.md, "Tuning", has every pass).
PLAIN_STEP = {"server-lr": 1.0, "server-momentum": 0.0}
MOMENTUM_STEP = {"server-lr": 0.5, "server-momentum": 0.9}
IVON_RECIPE = {"hess-init": 0.5, "beta2": 0.99999}


def _with_server_step(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [point | step for point in points for step in (PLAIN_STEP, MOMENTUM_STEP)]


GRIDS: dict[str, list[dict[str, Any]]] = {
    "fedavg": _with_server_step([{"lr": lr} for lr in (0.02, 0.05, 0.1)]),
    "fedavg-ivon": _with_server_step([{"lr": lr} | IVON_RECIPE for lr in (0.02, 0.05, 0.1)]),
    "fedpa": _with_server_step([{"lr": lr} for lr in (0.02, 0.05, 0.1)]),
    "bayes-admm": [{"lr": lr, "rho": rho} for lr in (3e-3, 1e-2) for rho in (2.0, 8.0)]
    + [{"lr": 1e-2, "rho": 2.0, "mc-samples": 2},
       {"lr": 0.03, "rho": 2.0, "temperature": 0.1, "hess-init": 0.1}],
    "admm": [{"lr": lr, "rho": rho} for lr in (0.03, 0.1, 0.3) for rho in (100.0, 300.0)],
}
GRID_SIZE = 6
QUICK = {"rounds": 2, "data": {"mnist1d-samples": 1000}, "mc": 4}


# BayesADMM's IVON step clipped per coordinate: without it its MNIST-1D preset diverged on
# Dirichlet(0.1) seeds 1 and 2; FedAvg's IVON client (lr 3e-4) lost accuracy with it
# (docs/BENCHMARKS.md, "IVON step clipping").
IVON_CLIP = {"bayes-admm": {"clip-radius": 10.0}}


def base_config(method: str) -> dict[str, Any]:
    """The method's digits preset with the tuned data set's keys (and IVON's clipping)."""
    config = method_config(method, "digits") | DATASET_KEYS[DATASET] | IVON_CLIP.get(method, {})
    config.pop("mlp-hidden", None)
    return config


def candidates(method: str) -> list[dict[str, Any]]:
    return [base_config(method) | point for point in GRIDS[method]]


def score(rounds: list[dict]) -> tuple[float, float]:
    """(validation accuracy, NLL) of one federation, each averaged over the last WINDOW rounds."""
    last = rounds[-1]["round"]
    return window_mean(rounds, "accuracy", last), window_mean(rounds, "nll", last)


def candidate_scores(runs: list[dict]) -> dict[str, Any]:
    """A candidate's runs (one per tuning setting): its score is the mean over the settings."""
    per_setting = {run["setting"]: score(run["rounds"]) for run in runs}
    return {
        "val_accuracy": sum(a for a, _ in per_setting.values()) / len(per_setting),
        "val_nll": sum(n for _, n in per_setting.values()) / len(per_setting),
        "per_setting": {s: {"val_accuracy": a, "val_nll": n} for s, (a, n) in per_setting.items()},
        "seconds": sum(run["seconds"] for run in runs),
        "cpu_seconds": sum(run["cpu_seconds"] for run in runs),
    }


def jobs(methods: list[str], rounds: int, data: dict, mc: int | None) -> list[tuple]:
    out = []
    for method in methods:
        for (index, config), setting in product(enumerate(candidates(method)), TUNING_SETTINGS):
            overrides = config | SETTINGS[setting] | data | {
                "num-server-rounds": rounds, "seed": SEED, "fraction-evaluate": 0.0,
                "server-val-fraction": VAL_FRACTION,
            }
            if overrides.get("strategy") == "fedpa":
                overrides["burnin-rounds"] = min(overrides.get("burnin-rounds", 0), rounds // 2)
            if mc is not None:
                overrides["eval-mc-samples"] = mc
            out.append((f"{method}#{index}", setting, SEED, overrides))
    return out


def preset_text(method: str, chosen: dict[str, Any], rows: list[dict], command: str,
                rounds: int) -> str:
    """The chosen candidate as a run config that `flwr run --run-config` takes as it is."""
    config = chosen | SETTINGS[PRESET_SETTING] | {"num-server-rounds": 100}
    grid = ", ".join(
        f"{_keys(r['point'])}: {r['val_accuracy']:.3f}" for r in rows
    )
    lines = [
        f"# {method} on MNIST-1D, tuned by `{command}`:",
        f"# {len(rows)} candidates, each run for {rounds} rounds on "
        f"{' and '.join(TUNING_SETTINGS)}",
        f"# (seed {SEED}), scored by accuracy on a validation split of {VAL_FRACTION:.0%} of the",
        "# training pool (never the test set), mean of the last 3 rounds and of the two settings.",
        f"# Candidates (validation accuracy): {grid}.",
        f"# Chosen: {_keys(rows[0]['point'])} (docs/BENCHMARKS.md, \"MNIST-1D\").",
        "#   flwr run . --run-config presets/" + f"{method}-{DATASET}.toml"
        + ' --federation-config "num-supernodes=10"',
    ]
    lines += [f"{key} = {_toml(value)}" for key, value in config.items()]
    return "\n".join(lines) + "\n"


def _keys(point: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items())


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "smoke run: 2 rounds on 1,000 signals; presets go to --out")
    parser.add_argument("--presets", type=Path, help="where the chosen presets go")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--rounds", type=int)
    add_jobs(parser)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (QUICK["rounds"] if args.quick else ROUNDS)
    args.presets = args.presets or (args.out if args.quick else ROOT / "presets")
    args.data = QUICK["data"] if args.quick else {}
    args.mc = QUICK["mc"] if args.quick else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the worker processes
    command = command_line("tune.py", argv)
    started = time.perf_counter()
    todo = jobs(args.methods, args.rounds, args.data, args.mc)
    print(f"{len(todo)} federations ({len(args.methods)} methods x {GRID_SIZE} candidates x "
          f"{len(TUNING_SETTINGS)} settings, {args.rounds} rounds), {args.jobs} at once",
          flush=True)
    runs: dict[str, list[dict]] = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for run in pool.map(_run, todo):
            runs.setdefault(run["method"], []).append(run)
            method, index = run["method"].split("#")
            accuracy, nll = score(run["rounds"])
            print(f"  {method:12s} {_keys(GRIDS[method][int(index)]):22s} {run['setting']:20s} "
                  f"val acc {accuracy:.4f} nll {nll:.4f} ({run['seconds']:.0f} s, "
                  f"CPU {run['cpu_seconds']:.0f} s)", flush=True)
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for name, candidate_runs in runs.items():
        method, index = name.split("#")
        results[method].append({"point": GRIDS[method][int(index)]}
                               | candidate_scores(candidate_runs))
    args.presets.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table = [f"| method | candidates (val acc % ({' / '.join(TUNING_SETTINGS)}), NLL) | chosen |",
             "|---|---|---|"]
    for method, rows in results.items():
        rows.sort(key=lambda r: (-r["val_accuracy"], r["val_nll"]))
        chosen = base_config(method) | rows[0]["point"]
        (args.presets / f"{method}-{DATASET}.toml").write_text(
            preset_text(method, chosen, rows, command, args.rounds))
        cells = "; ".join(f"{_keys(r['point'])}: {100 * r['val_accuracy']:.1f} ("
                          + " / ".join(f"{100 * r['per_setting'][t]['val_accuracy']:.1f}"
                                       for t in TUNING_SETTINGS)
                          + f"), {r['val_nll']:.3f}" for r in rows)
        table.append(f"| {method} | {cells} | {_keys(rows[0]['point'])} |")
    wall = time.perf_counter() - started
    cpu = sum(r["cpu_seconds"] for rows in results.values() for r in rows)
    text = (f"# Tuning on {' and '.join(TUNING_SETTINGS)}\n\n`{command}`: {GRID_SIZE} candidates "
            f"per method, each run on both settings for {args.rounds} rounds, seed {SEED}, scored "
            f"on a {VAL_FRACTION:.0%} validation split of the training pool (mean of the last "
            f"{WINDOW} rounds and of the two settings); wall time "
            f"{wall / 60:.1f} min ({cpu / 60:.1f} CPU-min) on {machine()}.\n\n"
            + "\n".join(table) + "\n")
    save_report(args.out, "tuning", text, json.dumps({
        "command": command, "settings": list(TUNING_SETTINGS), "seed": SEED, "rounds": args.rounds,
        "val_fraction": VAL_FRACTION, "wall_seconds": wall, "machine": machine(),
        "methods": results,
    }, indent=1))
    print(f"Wrote {args.out / 'tuning.md'}, tuning.json and {len(results)} preset(s) to "
          f"{args.presets}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
