"""Uncertainty of the final global model with the defaults: FedAvg (SGD) and BayesADMM (IVON),
the network at the mean and, for BayesADMM, the Bayesian model average (BMA).

Each run is a real federation in one process (`benchmarks.inprocess.simulate`) with every key at
its pyproject.toml default (digits, Dirichlet(0.5), 20 rounds) but the method's own
(`strategy`, `optimizer`) and `fraction-evaluate = 0`, which only skips the clients' own
evaluation. Reported per method and predictive, mean +- std over the seeds, from the last
round's `uncertainty` entry of results.json (server_app/uncertainty.py): test accuracy, NLL and
ECE, OOD AUROC of the predictive entropy (and of the mutual information for BMA) against each
OOD set, selective accuracy at 80% and 90% coverage, AURC, and the NLL under the strongest
covariate shift. For BayesADMM the same numbers for the BMA over its final posterior with the
precision scaled by each of PRECISION_SCALES (below 1: a broader posterior), to see whether a
broader posterior would pay.

    python benchmarks/uncertainty.py --jobs 2    # the measurement (3 seeds, 20 rounds)
    python benchmarks/uncertainty.py --quick     # smoke run: 1 seed, 2 rounds
    python benchmarks/uncertainty.py --run-config "dataset='mnist1d' num-server-rounds=100"
    python benchmarks/uncertainty.py --setting mnist1d-patho2 --rounds 100 --jobs 2

`--run-config` sets other keys for every run (Flower's "key=value ..." syntax), e.g. another
data set: its OOD sets are task/ood.py's for that data set. `--setting` runs one setting of
benchmarks/heterogeneity.py instead of the defaults, each method with its tuned preset there
(the federations of its tables, with the uncertainty evaluation read from their last round).

Writes uncertainty.md and uncertainty.json to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
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
    add_jobs, add_run_config, add_seeds_and_rounds, benchmark_parser, command_line, machine,
    mean_std, save_report, start_worker,
)
from benchmarks.heterogeneity import SETTINGS, num_nodes, run_overrides  # noqa: E402
from task.ood import SHIFT_LEVELS  # noqa: E402

NUM_NODES = 10
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg", "optimizer": "sgd"},
    "bayes-admm": {"strategy": "bayes-admm", "optimizer": "ivon"},
}
QUICK = {"rounds": 2, "seeds": [0], "mc": 4, "scales": (1.0, 0.1)}
# None: the pyproject.toml default
FULL = {"rounds": None, "seeds": [0, 1, 2], "mc": None, "scales": (1.0, 0.3, 0.1, 0.03, 0.01)}
STRONGEST_SHIFT = f"{SHIFT_LEVELS[-1]:g}"


def final_numbers(entry: dict[str, Any], predictive: str) -> dict[str, float]:
    """The numbers of one predictive ("mean" or "bma") from a round's results.json entry."""
    prefix = "" if predictive == "mean" else "bma_"
    metrics = entry["uncertainty"][predictive]
    numbers = {k: float(entry[f"{prefix}{k}"]) for k in ("accuracy", "nll", "ece")}
    for score in ("entropy", "mi"):
        for ood, value in metrics.get(f"ood_auroc_{score}", {}).items():
            numbers[f"auroc_{score}_{ood}"] = value
    numbers |= {k: metrics[k] for k in ("selective_accuracy_80", "selective_accuracy_90", "aurc")}
    numbers[f"shift_{STRONGEST_SHIFT}_nll"] = metrics["shift"][STRONGEST_SHIFT]["nll"]
    numbers[f"shift_{STRONGEST_SHIFT}_accuracy"] = metrics["shift"][STRONGEST_SHIFT]["accuracy"]
    return numbers


def scaled_posterior_numbers(folder: str, keys: dict, scales: tuple[float, ...]) -> dict:
    """The BMA's numbers over the run's saved posterior with its precision times each scale,
    by the server's own evaluation (the draws of its last round's seed)."""
    import torch

    from benchmarks.inprocess import default_run_config
    from server_app.evaluation import evaluate_bma
    from server_app.uncertainty import UncertaintyEvaluation
    from task.config import parse_run_config
    from task.data import server_test_set
    from task.models import build_model
    from task.params import numpy_to_record
    from task.predict import load_global_model

    cfg = parse_run_config({**default_run_config(), **keys})
    model = load_global_model(folder)
    net, test, device = build_model(model.cfg, model.spec), server_test_set(cfg), torch.device("cpu")
    evaluation, seed = UncertaintyEvaluation(cfg, test), cfg.seed + cfg.num_server_rounds
    numbers = {}
    for scale in scales:
        precision = {k: (v * scale).astype(v.dtype) for k, v in model.precision.items()}
        posterior = (numpy_to_record(model.mean), numpy_to_record(precision))
        entry = evaluate_bma(net, posterior, test, device, cfg.eval_mc_samples, seed)
        report = evaluation(net, posterior[0], posterior, device, seed)
        numbers[f"{scale:g}"] = final_numbers({**entry, "uncertainty": report.metrics}, "bma")
    return numbers


def _run(job: tuple[str, int, dict, tuple[float, ...], int]) -> dict:
    """One federation (in a worker process); the last round's numbers per predictive."""
    start_worker()
    from benchmarks.inprocess import simulate

    method, seed, keys, scales, nodes = job
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        outputs = simulate({**keys, "output-dir": folder}, nodes)
        last = outputs.results["rounds"][-1]
        scaled = scaled_posterior_numbers(folder, keys, scales) if "bma" in last["uncertainty"] else {}
    return {"method": method, "seed": seed, "overrides": keys, "round": last["round"],
            "seconds": time.perf_counter() - started,
            "numbers": {p: final_numbers(last, p) for p in last["uncertainty"]},
            "scaled_posterior": scaled}


def summarize(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    return {
        predictive: {key: mean_std([run["numbers"][predictive][key] for run in runs])
                     for key in runs[0]["numbers"][predictive]}
        for predictive in runs[0]["numbers"]
    }


def columns(keys: list[str]) -> list[tuple[str, str, int]]:
    """(key, title, scale) of the table's columns; the AUROC ones for the OOD sets in `keys`."""
    aurocs = [(k, f"AUROC {'H' if k.startswith('auroc_entropy') else 'MI'} "
               f"{k.split('_', 2)[2]}", 1) for k in keys if k.startswith("auroc_")]
    return [
        ("accuracy", "acc %", 100), ("nll", "NLL", 1), ("ece", "ECE", 1), *aurocs,
        ("selective_accuracy_80", "acc % @80% cov.", 100),
        ("selective_accuracy_90", "acc % @90% cov.", 100), ("aurc", "AURC", 1),
        (f"shift_{STRONGEST_SHIFT}_nll", f"NLL, noise {STRONGEST_SHIFT} std", 1),
    ]


def markdown_table(summary: dict[str, dict], seeds: list[int]) -> str:
    keys = list(dict.fromkeys(k for by in summary.values() for stats in by.values() for k in stats))
    table = columns(keys)
    head = ["method"] + [title for _, title, _ in table]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, by_predictive in summary.items():
        for predictive, stats in by_predictive.items():
            cells = [method + (" (BMA)" if predictive == "bma" else "")]
            for key, _, scale in table:
                if key not in stats:
                    cells.append("–")
                    continue
                digits = 1 if scale == 100 else 3
                cells.append(f"{stats[key]['mean'] * scale:.{digits}f} ± "
                             f"{stats[key]['std'] * scale:.{digits}f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\nSeeds {seeds}; H: predictive entropy, MI: mutual information (BMA only); "
        "'–': not defined for a single set of weights."
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "smoke run: 1 seed, 2 rounds")
    add_seeds_and_rounds(parser)
    add_jobs(parser)
    add_run_config(parser, '"key=value ..." for every run, e.g. "dataset=\'mnist1d\'"')
    parser.add_argument("--setting", choices=sorted(SETTINGS),
                        help="a heterogeneity setting, each method with its tuned preset there")
    parser.add_argument("--scales", nargs="+", type=float,
                        help="the posterior precision's scales for the BMA (1: as fitted)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    args.seeds = args.seeds if args.seeds is not None else defaults["seeds"]
    args.rounds = args.rounds if args.rounds is not None else defaults["rounds"]
    args.scales = tuple(args.scales) if args.scales else defaults["scales"]
    if args.setting and args.rounds is None:
        parser.error("--setting needs --rounds (its presets are 100-round runs)")
    args.mc = defaults["mc"]
    return args


def method_keys(method: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One federation's keys: the defaults but the method's own, or with --setting the tuned
    preset heterogeneity.py runs there; then the run's size and --run-config."""
    if args.setting:
        keys = run_overrides(method, args.setting, seed, args.rounds, args.mc)
    else:
        keys = METHODS[method] | {"fraction-evaluate": 0.0, "seed": seed}
        keys |= {} if args.rounds is None else {"num-server-rounds": args.rounds}
        keys |= {} if args.mc is None else {"eval-mc-samples": args.mc}
    return keys | args.overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the worker processes
    started = time.perf_counter()
    nodes = num_nodes(args.setting) if args.setting else NUM_NODES
    jobs = [(m, seed, method_keys(m, args, seed), args.scales, nodes)
            for m in METHODS for seed in args.seeds]
    print(f"{len(jobs)} federations, {args.jobs} at once", flush=True)
    runs = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for run in pool.map(_run, jobs):
            shown = " | ".join(f"{p}: acc {n['accuracy']:.4f} nll {n['nll']:.4f}"
                               for p, n in run["numbers"].items())
            print(f"  {run['method']:11s} seed {run['seed']}: {shown} ({run['seconds']:.0f} s)",
                  flush=True)
            runs.append(run)
    summary = {m: summarize([r for r in runs if r["method"] == m]) for m in METHODS}
    with_posterior = [r["scaled_posterior"] for r in runs if r["scaled_posterior"]]
    scaled = {
        f"precision x{scale}": {"bma": {key: mean_std([run[scale][key] for run in with_posterior])
                                        for key in with_posterior[0][scale]}}
        for scale in with_posterior[0]
    }
    rounds = runs[0]["round"]
    results = {
        "command": command_line("uncertainty.py", argv), "overrides": args.overrides,
        "setting": args.setting, "num_nodes": nodes, "rounds": rounds, "seeds": args.seeds,
        "machine": machine(), "wall_seconds": time.perf_counter() - started,
        "summary": summary, "scaled_posterior": scaled, "runs": runs,
    }
    data = args.setting or runs[0]["overrides"].get("dataset", "digits")
    text = (f"# Uncertainty of the global model\n\n`{results['command']}`: {data}, "
            f"{nodes} clients, round {rounds}, overrides {args.overrides or 'none'}; wall time "
            f"{results['wall_seconds'] / 60:.1f} min on {results['machine']}.\n\n"
            + markdown_table(summary, args.seeds) + "\n\n## BayesADMM's BMA with the posterior "
            "precision scaled\n\n" + markdown_table(scaled, args.seeds) + "\n")
    save_report(args.out, "uncertainty", text, json.dumps(results, separators=(",", ":")))
    print(f"Wrote {args.out / 'uncertainty.md'} and uncertainty.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
