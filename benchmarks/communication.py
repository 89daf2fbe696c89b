"""Accuracy against bytes sent: each method with each codec (docs/ALGORITHMS.md, "Compressed
communication") on strongly heterogeneous digits, Dirichlet(0.1) over 10 clients.

Every method runs with its tuned digits preset (as in benchmarks/heterogeneity.py); a variant
adds only the codec keys. Bytes are what results.json counts per round, `bytes_up` + `bytes_down`
(the encoded messages, config and metrics included), summed over rounds. At the last round the
accuracy is the mean of its last three rounds, then mean +- std over seeds, and each variant is
compared with the same method in fp32 (accuracy lost, bytes ratio) and with FedAvg in fp32.

    python benchmarks/communication.py                  # 3 seeds, 50 rounds, every variant
    python benchmarks/communication.py --quick          # smoke run: 1 seed, 2 rounds, 4 variants
    python benchmarks/communication.py --variants fedavg/fp32 fedavg/q8 --seeds 0
    python benchmarks/communication.py --from-json a/communication.json b/communication.json
        # one report from the runs of earlier invocations (e.g. seeds run separately)

Writes communication.md, communication.json and communication-<setting>.png (accuracy against
cumulative MB) to --out (default benchmarks/results).
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
    save_figure, save_report, saved_runs, start_worker,
)
from benchmarks.heterogeneity import (  # noqa: E402
    NUM_NODES, SETTINGS as DATA_SETTINGS, run_overrides, window_mean,
)

# Data settings this benchmark runs (keys of benchmarks/heterogeneity.py's SETTINGS); MNIST-1D
# joins here once that data set has a setting there.
SETTINGS = ["digits-dir0.1"]

SHIFT = {"codec-reference": "shift"}
# "<method>/<codec>" -> the codec keys on top of the method's preset.
VARIANTS: dict[str, dict[str, Any]] = {
    "fedavg/fp32": {},
    "fedavg/bf16": {"uplink-codec": "bf16", "downlink-codec": "bf16"},
    "fedavg/q8": {"uplink-codec": "q8", "downlink-codec": "q8", **SHIFT},
    "fedavg/topk1%": {"uplink-codec": "topk", "topk-fraction": 0.01, **SHIFT},
    "fedpa/fp32": {},
    "fedpa/q8": {"uplink-codec": "q8", "downlink-codec": "q8", **SHIFT},
    "bayes-admm/fp32": {},
    "bayes-admm/q8": {"uplink-codec": "q8", "downlink-codec": "q8", **SHIFT},
}
# Issue 17's targets at the last round: (what, check on a variant's comparison row).
TARGETS: dict[str, tuple[str, Any]] = {
    "fedavg/q8": ("<= 0.27x bytes, <= 0.5 points lost",
                  lambda row: row["bytes_ratio"] <= 0.27 and row["points_lost"] <= 0.5),
    "fedavg/topk1%": ("<= 0.05x uplink, <= 2 points lost",
                      lambda row: row["uplink_ratio"] <= 0.05 and row["points_lost"] <= 2.0),
    "bayes-admm/q8": ("<= 1.0x FedAvg fp32 bytes, <= 0.5 points lost",
                      lambda row: row["vs_fedavg_fp32"] <= 1.0 and row["points_lost"] <= 0.5),
}
QUICK = {"rounds": 2, "seeds": [0], "mc": 2,
         "variants": ["fedavg/fp32", "fedavg/q8", "bayes-admm/fp32", "bayes-admm/q8"]}
MB = 1e6


def variant_overrides(variant: str, setting: str, seed: int, rounds: int, mc: int | None) -> dict:
    method = variant.split("/")[0]
    return run_overrides(method, setting, seed, rounds, mc) | VARIANTS[variant]


def _run(job: tuple[str, str, int, dict]) -> dict:
    """One federation (in a worker process): accuracy and bytes per round."""
    start_worker()
    from benchmarks.inprocess import simulate

    variant, setting, seed, overrides = job
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        outputs = simulate({**overrides, "output-dir": folder}, NUM_NODES)
    keep = ("accuracy", "bma_accuracy", "bytes_up", "bytes_down", "compression_up",
            "compression_down")
    rounds = [{"round": r["round"], **{k: r[k] for k in keep if k in r}}
              for r in outputs.results["rounds"]]
    return {"variant": variant, "setting": setting, "seed": seed, "overrides": overrides,
            "seconds": time.perf_counter() - started, "rounds": rounds}


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Accuracy at the last round (window mean) and cumulative bytes, mean +- std over seeds."""
    last = runs[0]["rounds"][-1]["round"]
    out = {"seeds": len(runs),
           "accuracy": mean_std([window_mean(r["rounds"], "accuracy", last) for r in runs])}
    for key in ("bytes_up", "bytes_down"):
        out[key] = mean_std([float(sum(x[key] for x in r["rounds"])) for r in runs])
    out["bytes"] = mean_std([float(sum(x["bytes_up"] + x["bytes_down"] for x in r["rounds"]))
                             for r in runs])
    if "bma_accuracy" in runs[0]["rounds"][-1]:
        out["bma_accuracy"] = mean_std([window_mean(r["rounds"], "bma_accuracy", last) for r in runs])
    return out


def compare(summary: dict[str, dict]) -> dict[str, dict]:
    """Each variant against its method in fp32, and against FedAvg in fp32."""
    rows = {}
    for variant, s in summary.items():
        base = summary.get(f"{variant.split('/')[0]}/fp32")
        fedavg = summary.get("fedavg/fp32")
        row = {"accuracy": s["accuracy"]["mean"], "mb": s["bytes"]["mean"] / MB}
        if base is not None:
            row |= {
                "points_lost": 100 * (base["accuracy"]["mean"] - s["accuracy"]["mean"]),
                "bytes_ratio": s["bytes"]["mean"] / base["bytes"]["mean"],
                "uplink_ratio": s["bytes_up"]["mean"] / base["bytes_up"]["mean"],
            }
        if fedavg is not None:
            row["vs_fedavg_fp32"] = s["bytes"]["mean"] / fedavg["bytes"]["mean"]
        if variant in TARGETS and base is not None and fedavg is not None:
            what, check = TARGETS[variant]
            row |= {"target": what, "met": bool(check(row))}
        rows[variant] = row
    return rows


def markdown_table(setting: str, summary: dict, rows: dict, rounds: int) -> str:
    lines = [
        f"### {setting}: accuracy at round {rounds} (mean of its last 3 rounds; mean ± std over "
        "seeds)",
        "",
        "| variant | seeds | accuracy % | lost vs fp32 (points) | total MB | bytes vs fp32 | uplink vs fp32 "
        "| bytes vs FedAvg fp32 | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, row in rows.items():
        acc = summary[variant]["accuracy"]
        cells = [
            str(summary[variant]["seeds"]),
            f"{acc['mean'] * 100:.1f} ± {acc['std'] * 100:.1f}",
            _fmt(row.get("points_lost"), "+.2f"),
            f"{row['mb']:.2f}",
            _fmt(row.get("bytes_ratio"), ".3f", "x"),
            _fmt(row.get("uplink_ratio"), ".3f", "x"),
            _fmt(row.get("vs_fedavg_fp32"), ".3f", "x"),
            row.get("target", ""),
            {True: "yes", False: "**no**"}.get(row.get("met"), ""),
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def plot(setting: str, by_variant: dict[str, list[dict]], path: Path) -> None:
    """Test accuracy against cumulative MB (up + down), mean over seeds, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(dict.fromkeys(v.split("/")[0] for v in by_variant))
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for variant, runs in by_variant.items():
            if not variant.startswith(method + "/") or not runs:
                continue
            mb = np.mean([np.cumsum([r["bytes_up"] + r["bytes_down"] for r in run["rounds"]])
                          for run in runs], axis=0) / MB
            acc = np.mean([[r["accuracy"] for r in run["rounds"]] for run in runs], axis=0)
            ax.plot(mb, acc, label=variant.split("/")[1])
        ax.set_xscale("log")
        ax.set_xlabel("cumulative MB sent (up + down)")
        ax.set_ylabel("test accuracy")
        ax.set_title(method)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Accuracy against bytes, {setting}")
    save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(
        __doc__, "smoke run: 1 seed, 2 rounds, FedAvg and BayesADMM in fp32 and q8"
    )
    parser.add_argument("--settings", nargs="+", choices=list(DATA_SETTINGS), default=SETTINGS)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    add_seeds_and_rounds(parser)
    parser.add_argument("--eval-mc-samples", type=int, help="BMA samples (default: the preset's)")
    add_jobs(parser)
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="re-render the report from the runs of saved communication.json files")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {
        "rounds": 50, "seeds": [0, 1, 2], "mc": None, "variants": list(VARIANTS),
    }
    args.variants = args.variants or defaults["variants"]
    args.seeds = args.seeds if args.seeds is not None else defaults["seeds"]
    args.rounds = args.rounds or defaults["rounds"]
    if args.eval_mc_samples is None:
        args.eval_mc_samples = defaults["mc"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        runs, meta = saved_runs(args.from_json, "variant")
        args.rounds = meta["rounds"].pop()
        args.settings = list(dict.fromkeys(r["setting"] for r in runs))
        args.variants = list(dict.fromkeys(r["variant"] for r in runs))
        args.seeds = sorted({r["seed"] for r in runs})
        command = " + ".join(f"`{c}`" for c in meta["commands"])
        return write_report(args, runs, command, meta["wall_seconds"])
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the worker processes
    started = time.perf_counter()
    jobs = [
        (variant, setting, seed,
         variant_overrides(variant, setting, seed, args.rounds, args.eval_mc_samples))
        for setting in args.settings for variant in args.variants for seed in args.seeds
    ]
    print(f"{len(jobs)} federations, {args.rounds} rounds, {args.jobs} at once", flush=True)
    runs = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for run in pool.map(_run, jobs):
            total = sum(r["bytes_up"] + r["bytes_down"] for r in run["rounds"]) / MB
            print(f"  {run['setting']} {run['variant']:16s} seed {run['seed']}: acc "
                  f"{run['rounds'][-1]['accuracy']:.4f}, {total:.2f} MB ({run['seconds']:.0f} s)",
                  flush=True)
            runs.append(run)
    command = command_line("communication.py", argv)
    return write_report(args, runs, f"`{command}`", time.perf_counter() - started)


def write_report(args: argparse.Namespace, runs: list[dict], command: str, wall: float) -> int:
    """communication.md, communication.json and one plot per setting in `args.out`."""
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": command, "rounds": args.rounds, "seeds": args.seeds,
        "num_nodes": NUM_NODES, "machine": machine(), "wall_seconds": wall, "settings": {},
    }
    sections = []
    for setting in args.settings:
        by_variant = {v: [r for r in runs if r["setting"] == setting and r["variant"] == v]
                      for v in args.variants}
        summary = {v: summarize(rs) for v, rs in by_variant.items()}
        rows = compare(summary)
        png = args.out / f"communication-{setting}.png"
        plot(setting, by_variant, png)
        results["settings"][setting] = {"data": DATA_SETTINGS[setting], "summary": summary,
                                        "comparison": rows, "plot": png.name, "runs": by_variant}
        sections.append(markdown_table(setting, summary, rows, args.rounds)
                        + f"\n\n![{setting}]({png.name})")
    text = (f"# Accuracy against bytes\n\n{command}: {NUM_NODES} clients, "
            f"{args.rounds} rounds, seeds {args.seeds}; wall time "
            f"{results['wall_seconds'] / 60:.1f} min on {results['machine']}.\n\n"
            + "\n\n".join(sections) + "\n")
    save_report(args.out, "communication", text, json.dumps(rounded(results), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
