"""Personalized models on heterogeneous digits and MNIST-1D: accuracy on each node's own test split.

Every node holds out `client-test-fraction` (0.2) of its data, seeded and never trained on; a
method is scored there by the personal models' accuracy, NLL and ECE at the end of the run, as
the mean over nodes (the headline), the example-weighted mean and the mean of the worst 10% of
nodes, next to the global model's on the same splits (from the same run). Methods:

- local-only: each node trains alone on its own training split, no federation, SGD with the
  FedAvg preset's settings for as many epochs as a BayesADMM node trains in the whole run;
- fedavg / fedavg+ft: FedAvg's global model, and fine-tuned on each node for `personal-epochs`
  (`personalize = finetune`);
- ditto: FedAvg plus Ditto's personal models (`personalize = ditto`, proximal weight mu);
- fedpa+ft: FedPA's global model fine-tuned;
- bayes-admm local: BayesADMM's local posterior (`personalize = posterior`, lambda 1e9: w = 1);
- bayes-admm interp: the natural-parameter interpolation of the global and the local posterior
  with lambda picked by each node on a validation split of its own training data (`personal-weight
  = auto`: `personal-val-fraction` of the training split, not trained on; never the test split).

Each method runs with its tuned preset for the data set (presets/<method>-<dataset>.toml); a setting replaces
only the data keys, and every method trains 5 local epochs per round (BayesADMM's preset has 10,
with a beta2 for them: it runs with beta2 "auto" here), so the local compute is equal except
Ditto's personal epochs (listed in the table).

    python benchmarks/personalization.py            # 4 settings, 3 seeds, 20 rounds, K = 10
    python benchmarks/personalization.py --quick    # smoke run: 1 setting, 1 seed, 2 rounds, K = 5
    python benchmarks/personalization.py --settings digits-patho2 --seeds 0 --rounds 20

Writes personalization.md, personalization.json and personalization-<setting>.png to --out.
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
    add_jobs, add_seeds_and_rounds, benchmark_parser, command_line, machine, mean_std, rounded,
    save_figure, save_report, start_worker,
)
from benchmarks.heterogeneity import _preset  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "digits-patho2": {"dataset": "digits", "partitioner": "pathological", "classes-per-client": 2},
    "digits-dir0.1": {"dataset": "digits", "partitioner": "dirichlet", "dirichlet-alpha": 0.1},
    # 5,000 signals, 4,000 of them over the nodes: 400 per node at K = 10, 40 at K = 100.
    "mnist1d-patho2": {"dataset": "mnist1d", "partitioner": "pathological", "classes-per-client": 2},
    "mnist1d-dir0.1": {"dataset": "mnist1d", "partitioner": "dirichlet", "dirichlet-alpha": 0.1},
}
DATA_KEYS = {"dataset", "partitioner", "dirichlet-alpha", "classes-per-client"}
PERSONAL_EPOCHS = 5  # fine-tuning and Ditto's personal epochs: the FedAvg preset's local epochs

# method -> (preset method, overrides on top of it): the preset is presets/<method>-<dataset>.toml
# (the network included: MNIST-1D's is `cnn1d`); "local-only" has no federation.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "local-only": ("fedavg", {}),
    "fedavg+ft": ("fedavg", {"personalize": "finetune"}),
    "ditto": ("fedavg", {"personalize": "ditto", "ditto-lambda": 0.1}),
    "fedpa+ft": ("fedpa", {"personalize": "finetune"}),
    "bayes-admm local": ("bayes-admm", {"personalize": "posterior", "personal-weight": 1e9}),
    "bayes-admm interp": ("bayes-admm", {"personalize": "posterior", "personal-weight": "auto"}),
    # The preset's cosine schedule takes the last rounds' learning rate to ~0 (0.6% of lr in
    # round 20 of 20): the last local solve then hardly leaves the global. A constant rate:
    "bayes-admm local const-lr": (
        "bayes-admm",
        {"personalize": "posterior", "personal-weight": 1e9, "cosine-lr": False},
    ),
    "bayes-admm interp const-lr": (
        "bayes-admm",
        {"personalize": "posterior", "personal-weight": "auto", "cosine-lr": False},
    ),
}
# Rows of the table: (label, method run, model in its summary). The global models come from the
# personalized runs (personalization leaves the federation's training unchanged).
ROWS = (
    ("local-only", "local-only", "personal"),
    ("fedavg (global)", "fedavg+ft", "global"),
    ("fedavg+ft", "fedavg+ft", "personal"),
    ("ditto", "ditto", "personal"),
    ("fedpa+ft", "fedpa+ft", "personal"),
    ("bayes-admm (global)", "bayes-admm local", "global"),
    ("bayes-admm local posterior", "bayes-admm local", "personal"),
    ("bayes-admm local posterior (BMA)", "bayes-admm local", "personal_bma"),
    ("bayes-admm interpolated", "bayes-admm interp", "personal"),
    ("bayes-admm interpolated (BMA)", "bayes-admm interp", "personal_bma"),
    ("bayes-admm const-lr (global)", "bayes-admm local const-lr", "global"),
    ("bayes-admm const-lr local posterior", "bayes-admm local const-lr", "personal"),
    ("bayes-admm const-lr local posterior (BMA)", "bayes-admm local const-lr", "personal_bma"),
    ("bayes-admm const-lr interpolated", "bayes-admm interp const-lr", "personal"),
    ("bayes-admm const-lr interpolated (BMA)", "bayes-admm interp const-lr", "personal_bma"),
)
METRICS = ("accuracy", "nll", "ece")
STATS = ("node_mean", "weighted", "worst10")
QUICK = {
    "rounds": 2, "seeds": [0], "settings": ["digits-patho2"], "local-epochs": 1, "mc": 4,
    "nodes": 5,
}
FULL = {
    "rounds": 20, "seeds": [0, 1, 2], "settings": list(SETTINGS), "local-epochs": 5, "mc": None,
    "nodes": 10,
}


def run_overrides(method: str, setting: str, seed: int, rounds: int, args) -> dict[str, Any]:
    preset, extra = METHODS[method]
    dataset = SETTINGS[setting]["dataset"]
    config = {k: v for k, v in _preset(f"{preset}-{dataset}.toml").items() if k not in DATA_KEYS}
    config |= SETTINGS[setting] | extra
    config |= {"num-server-rounds": rounds, "seed": seed, "personal-eval-every": rounds}
    if config.get("personalize") in ("finetune", "ditto"):
        config["personal-epochs"] = PERSONAL_EPOCHS
    if args.local_epochs is not None:
        config["local-epochs"] = args.local_epochs
        if config["strategy"] == "bayes-admm":  # the preset's beta2 fits its 10 epochs only
            config["beta2"] = "auto"
        if "personal-epochs" in config:
            config["personal-epochs"] = args.local_epochs
    if args.mc is not None:
        config["eval-mc-samples"] = args.mc
    if args.fraction_train is not None:
        config["fraction-train"] = args.fraction_train
    if config["strategy"] == "fedpa":
        config["burnin-rounds"] = min(config.get("burnin-rounds", 0), rounds // 2)
    return config


def epochs_per_round(method: str, overrides: dict[str, Any]) -> str:
    local = overrides["local-epochs"]
    if overrides.get("personalize") == "ditto":
        return f"{local} + {overrides['personal-epochs']}"
    if overrides.get("personalize") == "finetune":
        return f"{local} (+ {overrides['personal-epochs']} at the end)"
    return str(local)


def _run(job: tuple[str, str, int, dict, int, int]) -> dict:
    start_worker()
    method, setting, seed, overrides, num_nodes, local_only_epochs = job
    started = time.perf_counter()
    if method == "local-only":
        summary = local_only(overrides, num_nodes, local_only_epochs)
    else:
        from benchmarks.inprocess import simulate

        with tempfile.TemporaryDirectory() as folder:
            outputs = simulate({**overrides, "output-dir": folder}, num_nodes)
        summary = outputs.results["personalization"]
    return {
        "method": method, "setting": setting, "seed": seed, "overrides": overrides,
        "seconds": time.perf_counter() - started, "summary": summary,
    }


def local_only(overrides: dict[str, Any], num_nodes: int, epochs: int) -> dict[str, Any]:
    """Each node trains alone on its training split for `epochs` epochs; scored on its test
    split, summarized as the server summarizes personal models."""
    from benchmarks.inprocess import default_run_config
    from client_app.local import node_data, node_seed
    from client_app.optimizers import build_optimizer
    from client_app.training import train_epochs
    from server_app.personal import WORST_SHARE
    from task.config import parse_run_config
    from task.metrics import classification_metrics, predict_probs
    from task.models import build_model, resolve_device, seed_torch
    from task.personal import worst_share_mean

    cfg = parse_run_config({**default_run_config(), **overrides})
    device = resolve_device(cfg.device)
    scores, counts = [], []
    for node in range(num_nodes):
        node_config = {"num-partitions": num_nodes, "partition-id": node}
        train, test, spec = node_data(cfg, tuple(sorted(node_config.items())))
        seed = node_seed(cfg, node_config, node + 1, 1)
        seed_torch(seed)
        model = build_model(cfg, spec).to(device)
        optimizer = build_optimizer(cfg, model.parameters(), cfg.local_lr, len(train))
        train_epochs(model, train, optimizer, epochs, cfg.batch_size, device, seed)
        scores.append(classification_metrics(predict_probs(model, test.x, device), test.y))
        counts.append(len(test))
    total = sum(counts)
    stats = {
        m: {
            "node_mean": sum(s[m] for s in scores) / len(scores),
            "weighted": sum(s[m] * n for s, n in zip(scores, counts)) / total,
            "worst10": worst_share_mean([s[m] for s in scores], WORST_SHARE, m != "accuracy"),
        }
        for m in METRICS
    }
    return {"nodes": num_nodes, "personal": stats}


def summarize(runs: list[dict]) -> dict[str, dict]:
    """{row label: {metric: {stat: {mean, std over seeds}}}}."""
    table = {}
    for label, method, model in ROWS:
        chosen = [r for r in runs if r["method"] == method and model in r["summary"]]
        if not chosen:
            continue
        table[label] = {
            m: {s: mean_std([r["summary"][model][m][s] for r in chosen]) for s in STATS}
            for m in METRICS
        }
    return table


def markdown_table(setting: str, summary: dict, runs: list[dict], seeds: list[int]) -> str:
    compute = {r["method"]: r["compute"] for r in runs}
    head = ["method", "epochs / round", "acc % (node mean)", "acc % (weighted)",
            "acc % (worst 10%)", "NLL (node mean)", "ECE (node mean)"]
    lines = [
        f"### {setting}",
        "",
        f"Mean ± std over seeds {seeds}; each node's own test split.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for label, method, _ in ROWS:
        if label not in summary:
            continue
        row = summary[label]

        def cell(metric, stat, scale=1.0, digits=3):
            s = row[metric][stat]
            return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"

        lines.append("| " + " | ".join([
            label, compute[method], cell("accuracy", "node_mean", 100, 1),
            cell("accuracy", "weighted", 100, 1), cell("accuracy", "worst10", 100, 1),
            cell("nll", "node_mean"), cell("ece", "node_mean"),
        ]) + " |")
    return "\n".join(lines)


def plot(setting: str, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(summary)
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.38
    for i, (stat, name) in enumerate((("node_mean", "mean over nodes"), ("worst10", "worst 10%"))):
        values = [summary[label]["accuracy"][stat]["mean"] * 100 for label in labels]
        errors = [summary[label]["accuracy"][stat]["std"] * 100 for label in labels]
        ax.bar([x + (i - 0.5) * width for x in range(len(labels))], values, width, yerr=errors,
               label=name, capsize=2)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy on the node's test split (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    ax.set_title(f"{setting}: global vs personal models")
    save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, "smoke run: 1 setting, 1 seed, 3 rounds, 2 local epochs")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    add_seeds_and_rounds(parser)
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--local-epochs", type=int,
                        help="every method's, also the personal epochs (default 5)")
    parser.add_argument("--fraction-train", type=float,
                        help="share of the nodes sampled per round (default 1)")
    add_jobs(parser)
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    args.settings = args.settings or defaults["settings"]
    args.seeds = args.seeds if args.seeds is not None else defaults["seeds"]
    args.rounds = args.rounds or defaults["rounds"]
    if args.local_epochs is None:
        args.local_epochs = defaults["local-epochs"]
    args.mc = defaults["mc"]
    args.nodes = args.nodes or defaults["nodes"]
    return args


def check_settings(args: argparse.Namespace) -> None:
    """Exit before any federation runs if a setting cannot be split over the nodes (e.g.
    Dirichlet(0.1) over 100 nodes of digits' 1,437 training rows): a run that fails later takes
    the finished ones down with it."""
    from benchmarks.inprocess import default_run_config
    from task.config import ConfigError, parse_run_config
    from task.data import check_partitions, data_spec

    problems = []
    for setting in args.settings:
        for seed in args.seeds:
            overrides = run_overrides("fedavg+ft", setting, seed, args.rounds, args)
            cfg = parse_run_config({**default_run_config(), **overrides})
            try:
                check_partitions(cfg, data_spec(cfg), args.nodes)
            except ConfigError as error:
                problems.append(f"{setting} seed {seed}: {error}")
    if problems:
        raise SystemExit("cannot split the data as asked:\n  " + "\n  ".join(problems))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    bayes_epochs = run_overrides("bayes-admm local", args.settings[0], 0, args.rounds, args)[
        "local-epochs"
    ]
    check_settings(args)
    jobs = []
    for setting in args.settings:
        for method in args.methods:
            for seed in args.seeds:
                overrides = run_overrides(method, setting, seed, args.rounds, args)
                jobs.append((method, setting, seed, overrides, args.nodes,
                             args.rounds * bayes_epochs))
    print(f"{len(jobs)} runs, {args.jobs} at once", flush=True)
    runs = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for run in pool.map(_run, jobs):
            run["compute"] = (f"{args.rounds * bayes_epochs} in all"
                              if run["method"] == "local-only"
                              else epochs_per_round(run["method"], run["overrides"]))
            acc = run["summary"]["personal"]["accuracy"]["node_mean"]
            print(f"  {run['setting']:14s} {run['method']:18s} seed {run['seed']}: personal acc "
                  f"{acc:.4f} ({run['seconds']:.0f} s)", flush=True)
            runs.append(run)
    meta = {"command": command_line("personalization.py", argv), "rounds": args.rounds, "seeds": args.seeds,
            "nodes": args.nodes, "fraction_train": args.fraction_train or 1.0, "machine": machine(),
            "wall_seconds": time.perf_counter() - started}
    write_report(args.out, meta, runs, args.settings)
    return 0


def write_report(out: Path, meta: dict, runs: list[dict], settings: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {**meta, "settings": {}}
    sections = []
    for setting in settings:
        chosen = [r for r in runs if r["setting"] == setting]
        summary = summarize(chosen)
        png = out / f"personalization-{setting}.png"
        plot(setting, summary, png)
        results["settings"][setting] = {
            "data": SETTINGS[setting], "summary": summary, "plot": png.name, "runs": chosen,
        }
        sections.append(markdown_table(setting, summary, chosen, meta["seeds"])
                        + f"\n\n![{setting}]({png.name})")
    header = (f"# Personalized models\n\n`{meta['command']}`: {meta['nodes']} nodes "
              f"({meta['fraction_train']:.0%} sampled per round), "
              f"{meta['rounds']} rounds, seeds {meta['seeds']}; wall time "
              f"{meta['wall_seconds'] / 60:.1f} min on {meta['machine']}.\n")
    text = header + "\n" + "\n\n".join(sections) + "\n"
    save_report(out, "personalization", text, json.dumps(rounded(results), separators=(",", ":")))


if __name__ == "__main__":
    raise SystemExit(main())
