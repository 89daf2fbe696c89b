"""Accuracy under heterogeneity: FedAvg (SGD), FedAvg with an IVON client, FedPA, BayesADMM
(diagonal) and classic federated ADMM (BayesADMM's isotropic variant with SGD) on offline data
sets with strong label skew.

Every method runs with its preset for the data set (the one source of truth for its
hyperparameters): on digits and Synthetic the hand-tuned `presets/<method>-digits.toml`, on
MNIST-1D `presets/<method>-mnist1d.toml`, chosen by `benchmarks/tune.py` with the same grid size
for every method on a validation split of the training pool. A setting replaces only the data
keys (data set, partitioner, its skew, the number of nodes and the share sampled per round), the
number of rounds and the seed. Each run is a real federation in one process
(`benchmarks.inprocess.simulate`: the ServerApp loop, the strategies and the ClientApp handlers).

Reported as in the BayesADMM paper: at rounds 10, 25, 50 and 100, the mean of rounds r-2..r of
the server-side test metrics (accuracy, NLL, ECE, Brier), then mean +- std over seeds, and the
first round whose 3-round mean reaches the setting's target accuracy. Mean prediction for every
method, and Bayesian model averaging (BMA) for the diagonal BayesADMM, the one method with a
fitted global posterior.

    python benchmarks/heterogeneity.py                 # the full benchmark (3 seeds, 100 rounds)
    python benchmarks/heterogeneity.py --quick         # smoke run: 1 seed, 4 rounds, 2 settings
    python benchmarks/heterogeneity.py --settings digits-patho2 --methods fedavg bayes-admm
    python benchmarks/heterogeneity.py --from-json A/heterogeneity.json B/heterogeneity.json  # join, re-plot
    python benchmarks/heterogeneity.py --methods fedavg fedpa --run-config "server-momentum=0.9"

`--run-config` sets keys for every run on top of the presets and the setting (Flower's
"key=value ..." syntax): a diagnostic outside the fair tuning, recorded in the report's command.

Writes heterogeneity.md (the tables), heterogeneity.json (the tables' numbers and every run's
per-round metrics) and heterogeneity-<setting>.png (test accuracy and NLL per round, mean and
range over seeds) to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_jobs, add_run_config, add_seeds_and_rounds, benchmark_parser, command_line, machine,
    mean_std, rounded, save_figure, save_report, saved_runs, start_worker,
)

PRESETS = ROOT / "presets"
NUM_NODES = 10
REPORT_ROUNDS = (10, 25, 50, 100)
WINDOW = 3  # rounds averaged at each reported round: r-2, r-1, r

# Keys a setting decides; every other key comes from the method's preset.
SETTINGS: dict[str, dict[str, Any]] = {
    "digits-dir0.1": {"dataset": "digits", "partitioner": "dirichlet", "dirichlet-alpha": 0.1},
    "digits-dir0.5": {"dataset": "digits", "partitioner": "dirichlet", "dirichlet-alpha": 0.5},
    "digits-patho2": {"dataset": "digits", "partitioner": "pathological", "classes-per-client": 2},
    # FedProx's Synthetic(1, 1) pooled and split over the clients by label with Dirichlet(0.5).
    "synthetic-1-1": {
        "dataset": "synthetic", "synthetic-alpha": 1.0, "synthetic-beta": 1.0,
        "partitioner": "dirichlet", "dirichlet-alpha": 0.5,
    },
    # MNIST-1D: 5,000 signals (4,000 to train) over 10 nodes, all in every round ...
    "mnist1d-dir0.1": {"dataset": "mnist1d", "partitioner": "dirichlet", "dirichlet-alpha": 0.1},
    "mnist1d-patho2": {
        "dataset": "mnist1d", "partitioner": "pathological", "classes-per-client": 2,
    },
    # ... and 50,000 over 100 nodes (400 each, as above), 10 of them sampled per round.
    "mnist1d-dir0.1-k100": {
        "dataset": "mnist1d", "mnist1d-samples": 50_000, "partitioner": "dirichlet",
        "dirichlet-alpha": 0.1, "fraction-train": 0.1,
    },
    "mnist1d-patho2-k100": {
        "dataset": "mnist1d", "mnist1d-samples": 50_000, "partitioner": "pathological",
        "classes-per-client": 2, "fraction-train": 0.1,
    },
}
SETTING_NODES = {"mnist1d-dir0.1-k100": 100, "mnist1d-patho2-k100": 100}  # others: NUM_NODES
# Rounds-to-target: the first round whose 3-round mean test accuracy reaches this.
TARGET_ACCURACY = {"digits": 0.90, "synthetic": 0.70, "mnist1d": 0.70}
SETTING_KEYS = {
    "dataset", "synthetic-alpha", "synthetic-beta", "partitioner", "dirichlet-alpha",
    "classes-per-client", "num-server-rounds", "seed", "output-dir", "mnist1d-samples",
    "fraction-train", "server-val-fraction",
}

# FedAvg with an IVON client has no preset of its own: the FedAvg preset (server step, local
# epochs, batch size, network) with the IVON client settings of the BayesADMM preset, so that the
# two differ in the server step, the duals and the prior, not in the local optimizer. IVON is
# created afresh every round (ess = N / temperature).
IVON_KEYS = ("optimizer", "lr", "hess-init", "beta2", "temperature", "prior-precision", "mc-samples")

# name -> (digits preset file, preset whose IVON_KEYS replace the first one's, or None). On
# MNIST-1D every method has its own tuned preset, `<name>-mnist1d.toml`.
METHODS: dict[str, tuple[str, str | None]] = {
    "fedavg": ("fedavg-digits.toml", None),
    "fedavg-ivon": ("fedavg-digits.toml", "bayes-admm-digits.toml"),
    "fedpa": ("fedpa-digits.toml", None),
    "bayes-admm": ("bayes-admm-digits.toml", None),
    "admm": ("admm-digits.toml", None),
}
TUNED_DATASETS = ("mnist1d",)

METRICS = ("accuracy", "nll", "ece", "brier")
QUICK = {"rounds": 4, "seeds": [0], "settings": ["digits-patho2", "mnist1d-patho2"], "mc": 4}


def method_config(method: str, dataset: str = "digits") -> dict[str, Any]:
    """The method's preset(s) for `dataset` with the setting keys removed."""
    if dataset in TUNED_DATASETS:
        config = _preset(f"{method}-{dataset}.toml")
    else:
        preset_file, ivon_file = METHODS[method]
        config = _preset(preset_file)
        if ivon_file is not None:
            ivon = _preset(ivon_file)
            config |= {k: ivon[k] for k in IVON_KEYS if k in ivon}
    return {k: v for k, v in config.items() if k not in SETTING_KEYS}


def _preset(name: str) -> dict[str, Any]:
    return tomllib.loads((PRESETS / name).read_text())


def num_nodes(setting: str) -> int:
    return SETTING_NODES.get(setting, NUM_NODES)


def run_overrides(method: str, setting: str, seed: int, rounds: int, mc: int | None) -> dict:
    overrides = method_config(method, SETTINGS[setting]["dataset"]) | SETTINGS[setting]
    overrides |= {"num-server-rounds": rounds, "seed": seed, "fraction-evaluate": 0.0}
    if mc is not None:
        overrides["eval-mc-samples"] = mc
    if overrides.get("strategy") == "fedpa":
        # Short runs still reach FedPA's sampling rounds (the preset's burn-in is 10 rounds).
        overrides["burnin-rounds"] = min(overrides.get("burnin-rounds", 0), rounds // 2)
    return overrides


def _run(job: tuple[str, str, int, dict]) -> dict:
    """One federation (in a worker process); returns its per-round server metrics, its wall
    time and the CPU time of its process (the machine may be shared: CPU time extrapolates)."""
    start_worker()
    from benchmarks.inprocess import simulate

    method, setting, seed, overrides = job
    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as folder:
        outputs = simulate({**overrides, "output-dir": folder}, num_nodes(setting))
    keep = [*METRICS, *(f"bma_{m}" for m in METRICS)]
    rounds = [
        {"round": r["round"], **{k: float(r[k]) for k in keep if k in r}}
        for r in outputs.results["rounds"]
    ]
    return {
        "method": method, "setting": setting, "seed": seed, "overrides": overrides,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started, "rounds": rounds,
    }


def cost_rank(job: tuple[str, str, int, dict]) -> tuple:
    """Orders federations by their rough cost per round, to start the longest first: MNIST-1D
    (a CNN on the largest partitions) before digits and Synthetic, then by the local passes of
    the nodes that train in a round. The data set's size comes before the passes so that a
    worker process meets each generated MNIST-1D pool in one stretch (its cache keeps a few)."""
    _, setting, _, overrides = job
    sampled = num_nodes(setting) * overrides.get("fraction-train", 1.0)
    passes = overrides.get("local-epochs", 5) * overrides.get("mc-samples", 1)
    return overrides["dataset"] == "mnist1d", overrides.get("mnist1d-samples", 0), sampled * passes


def report_rounds(num_rounds: int) -> list[int]:
    chosen = [r for r in REPORT_ROUNDS if r <= num_rounds]
    return chosen if chosen and chosen[-1] == num_rounds else [*chosen, num_rounds]


def window_mean(rounds: list[dict], key: str, at: int) -> float:
    values = [r[key] for r in rounds if at - WINDOW < r["round"] <= at and key in r]
    return sum(values) / len(values) if values else math.nan


def predictions(runs: list[dict]) -> list[str]:
    """'' for the mean prediction, 'bma_' too when the runs have a posterior."""
    return ["", "bma_"] if "bma_accuracy" in runs[0]["rounds"][-1] else [""]


def rounds_to_target(rounds: list[dict], key: str, target: float) -> int | None:
    """The first round whose window mean of `key` reaches `target`, or None."""
    return next(
        (r["round"] for r in rounds if window_mean(rounds, key, r["round"]) >= target), None
    )


def summarize(runs: list[dict], at: list[int], target: float) -> dict:
    """{prediction: {round: {metric: {mean, std}}, "to_target": [round or None per seed]}}
    over the seeds in `runs`."""
    table = {}
    for prefix in predictions(runs):
        label = "bma" if prefix else "mean"
        table[label] = {
            str(r): {
                m: mean_std([window_mean(run["rounds"], prefix + m, r) for run in runs])
                for m in METRICS
            }
            for r in at
        }
        table[label]["to_target"] = [
            rounds_to_target(run["rounds"], prefix + "accuracy", target) for run in runs
        ]
    return table


def curve(runs: list[dict], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Rounds, and per round the mean, min and max over the seeds."""
    rounds = [r["round"] for r in runs[0]["rounds"]]
    per_round = [[run["rounds"][i].get(key, math.nan) for run in runs] for i in range(len(rounds))]
    return (
        rounds,
        [sum(v) / len(v) for v in per_round],
        [min(v) for v in per_round],
        [max(v) for v in per_round],
    )


def setting_target(setting: str) -> float:
    return TARGET_ACCURACY[SETTINGS[setting]["dataset"]]


def markdown_table(setting: str, summary: dict[str, dict], at: list[int], seeds: int) -> str:
    """Accuracy at every reported round; NLL, ECE and Brier at the last; rounds to target."""
    last = at[-1]
    target = setting_target(setting)
    head = (["method"] + [f"acc % @{r}" for r in at]
            + [f"{m} @{last}" for m in ("NLL", "ECE", "Brier")]
            + [f"rounds to {target:.0%} (per seed)"])
    lines = [
        f"### {setting}",
        "",
        f"{num_nodes(setting)} clients; "
        + ", ".join(f"{k} = {v}" for k, v in SETTINGS[setting].items())
        + f". Mean +- std over {seeds} seed(s) "
        f"of the mean of rounds r-{WINDOW - 1}..r.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for method, table in summary.items():
        for label, by_round in table.items():
            name = method if label == "mean" else f"{method} (BMA)"
            stats = [(r, "accuracy") for r in at] + [(last, m) for m in METRICS[1:]]
            cells = [name]
            for r, m in stats:
                s = by_round[str(r)][m]
                scale, digits = (100, 1) if m == "accuracy" else (1, 3)
                cells.append(f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}")
            cells.append(", ".join("–" if r is None else str(r) for r in by_round["to_target"]))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(setting: str, by_method: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("accuracy", "nll")):
        for i, (method, runs) in enumerate(by_method.items()):
            color = f"C{i}"
            for prefix in predictions(runs):
                x, mean, low, high = curve(runs, prefix + metric)
                style = "--" if prefix else "-"
                label = method + (" (BMA)" if prefix else "")
                ax.plot(x, mean, style, color=color, label=label)
                ax.fill_between(x, low, high, color=color, alpha=0.12, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
        if metric == "nll":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    seeds = len(next(iter(by_method.values())))
    fig.suptitle(f"{setting}: {num_nodes(setting)} clients, mean (band: min to max) over "
                 f"{seeds} seed(s)")
    save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "smoke run: 1 seed, 4 rounds, 2 settings, 4 BMA samples")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    add_seeds_and_rounds(parser)
    parser.add_argument("--eval-mc-samples", type=int,
                        help="BMA samples per evaluation (default: the preset's)")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="re-render the tables and plots of saved heterogeneity.json files, "
                        "their runs joined (a later file's run of a method, setting and seed wins)")
    add_run_config(parser, '"key=value ..." for every run, over the presets and the setting')
    add_jobs(parser)
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {
        "rounds": max(REPORT_ROUNDS), "seeds": [0, 1, 2], "settings": list(SETTINGS), "mc": None,
    }
    args.settings = args.settings or defaults["settings"]
    args.seeds = args.seeds if args.seeds is not None else defaults["seeds"]
    args.rounds = args.rounds or defaults["rounds"]
    if args.eval_mc_samples is None:
        args.eval_mc_samples = defaults["mc"]
    return args


def federation_jobs(args: argparse.Namespace) -> list[tuple[str, str, int, dict]]:
    """(method, setting, seed, run config) of every federation the arguments ask for."""
    return [
        (method, setting, seed,
         run_overrides(method, setting, seed, args.rounds, args.eval_mc_samples) | args.overrides)
        for setting in args.settings for method in args.methods for seed in args.seeds
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:  # re-render tables and plots of a finished benchmark
        runs, saved = saved_runs(args.from_json, "method")
        first = json.loads(args.from_json[0].read_text())
        meta = {"command": "` and `".join(saved["commands"]), "rounds": saved["rounds"].pop(),
                "seeds": sorted({r["seed"] for r in runs}), "machine": first["machine"],
                "wall_seconds": saved["wall_seconds"]}
        settings = list(dict.fromkeys(r["setting"] for r in runs))
        # Methods in the benchmark's own order, whichever file holds them.
        methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
        write_report(args.out, meta, runs, settings, methods)
        return 0

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the worker processes
    started = time.perf_counter()
    jobs = federation_jobs(args)
    print(f"{len(jobs)} federations ({len(args.settings)} settings x {len(args.methods)} methods "
          f"x {len(args.seeds)} seeds, {args.rounds} rounds), {args.jobs} at once", flush=True)
    # Longest first, so that no core idles at the end while one long federation finishes;
    # the report keeps the jobs' own order.
    order = sorted(range(len(jobs)), key=lambda i: cost_rank(jobs[i]), reverse=True)
    runs: list[dict] = [{}] * len(jobs)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, run in zip(order, pool.map(_run, [jobs[i] for i in order])):
            last = run["rounds"][-1]
            print(f"  {run['setting']:14s} {run['method']:12s} seed {run['seed']}: "
                  f"acc {last['accuracy']:.4f} nll {last['nll']:.4f} ({run['seconds']:.0f} s, "
                  f"CPU {run['cpu_seconds']:.0f} s)", flush=True)
            runs[i] = run
    meta = {
        "command": command_line("heterogeneity.py", argv), "rounds": args.rounds, "seeds": args.seeds,
        "machine": machine(), "wall_seconds": time.perf_counter() - started,
    }
    write_report(args.out, meta, runs, args.settings, args.methods)
    return 0


def write_report(out: Path, meta: dict, runs: list[dict], settings: list[str],
                 methods: list[str]) -> None:
    """heterogeneity.md, heterogeneity.json and one plot per setting in `out`."""
    at = report_rounds(meta["rounds"])
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        **meta, "report_rounds": at, "window": WINDOW, "settings": {},
    }
    sections = []
    for setting in settings:
        by_method = {
            m: [r for r in runs if r["setting"] == setting and r["method"] == m] for m in methods
        }
        by_method = {m: rs for m, rs in by_method.items() if rs}  # joined files may differ
        summary = {m: summarize(rs, at, setting_target(setting)) for m, rs in by_method.items()}
        png = out / f"heterogeneity-{setting}.png"
        plot(setting, by_method, png)
        results["settings"][setting] = {
            "data": SETTINGS[setting],
            "num_nodes": num_nodes(setting),
            "target_accuracy": setting_target(setting),
            "cpu_seconds": sum(r.get("cpu_seconds", math.nan) for rs in by_method.values()
                               for r in rs),
            "summary": summary,
            "plot": png.name,
            "runs": by_method,
        }
        sections.append(markdown_table(setting, summary, at, len(meta["seeds"]))
                        + f"\n\n![{setting}]({png.name})")
    cpu = sum(r.get("cpu_seconds", math.nan) for r in runs)
    header = (f"# Accuracy under heterogeneity\n\n`{meta['command']}`: "
              f"{meta['rounds']} rounds, seeds {meta['seeds']}; wall time "
              f"{meta['wall_seconds'] / 60:.1f} min ({cpu / 60:.1f} CPU-min in the federations) "
              f"on {meta['machine']}.\n")
    text = header + "\n" + "\n\n".join(sections) + "\n"
    save_report(out, "heterogeneity", text, json.dumps(rounded(results), separators=(",", ":")))
    print(f"Wrote {out / 'heterogeneity.md'}, heterogeneity.json and {len(settings)} plot(s)")


if __name__ == "__main__":
    raise SystemExit(main())
