"""Where BayesADMM's Bayesian model average stands against its mean prediction, and why.

For each run (BayesADMM with IVON on its defaults, digits Dirichlet(0.1), 10 clients; variants
by --variant key=value), one in-process federation, then its final global posterior is scored on
the run's own test split: the mean network's NLL, the logit divisor in DIVISORS that minimizes
it (below 1: the mean network is underconfident), and the BMA's NLL over --draws weight draws at
the calibrated precision and at precision x2 and x4 (narrower posteriors). More draws shrink
only the Monte Carlo error; a BMA above the mean at every width means the spread itself costs.

    python benchmarks/bma_gap.py --jobs 2                              # 3 seeds, 30 rounds
    python benchmarks/bma_gap.py --jobs 2 --rounds 60
    python benchmarks/bma_gap.py --jobs 2 --variant mc-samples=2
    python benchmarks/bma_gap.py --quick                               # smoke run

Writes bma-gap.md and bma-gap.json to --out.
"""

from __future__ import annotations

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
    add_jobs, add_seeds_and_rounds, benchmark_parser, command_line, machine, rounded,
    save_report, start_worker,
)

NUM_NODES = 10
DATA = {"dataset": "digits", "partitioner": "dirichlet", "dirichlet-alpha": 0.1}
DIVISORS = (0.7, 0.8, 0.9, 1.0, 1.1)
PRECISION_SCALES = (2.0, 4.0)
QUICK = {"seeds": [0], "rounds": 2, "draws": 8, "nodes": 4}
FULL = {"seeds": [0, 1, 2], "rounds": 30, "draws": 512, "nodes": NUM_NODES}


def _nll(probs, labels) -> float:
    import numpy as np

    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def posterior_scores(folder: str, seed: int, draws: int) -> dict[str, Any]:
    """Mean NLL, best logit divisor and BMA NLLs of the run saved in `folder`."""
    import torch

    from task.data import server_test_set
    from task.models import build_model
    from task.params import load_record, numpy_to_record
    from task.predict import bma_probs, load_global_model, prepare

    model = load_global_model(folder)
    # model.json keeps what predicting needs, not the run's seed: the test split needs it.
    test = server_test_set(model.cfg.model_copy(update={"seed": seed}))
    x, device = prepare(model, test.x), torch.device("cpu")
    net = build_model(model.cfg, model.spec)
    load_record(net, numpy_to_record(model.mean))
    net.eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).double()
    by_divisor = {d: _nll(torch.softmax(logits / d, 1).numpy(), test.y) for d in DIVISORS}
    scores = {
        "accuracy": float((logits.argmax(1).numpy() == test.y).mean()),
        "mean_nll": by_divisor[1.0],
        "best_divisor": min(by_divisor, key=by_divisor.get),
        "nll_by_divisor": {str(d): v for d, v in by_divisor.items()},
    }
    for scale in (1.0, *PRECISION_SCALES):
        precision = {k: v * scale for k, v in model.precision.items()}
        probs, _, _ = bma_probs(net, model.mean, precision, x, device, draws, seed)
        scores[f"bma_nll_x{scale:g}"] = _nll(probs, test.y)
    return scores


def _run(job: tuple[dict[str, Any], int, int, int]) -> dict[str, Any]:
    start_worker()
    from benchmarks.inprocess import simulate

    keys, seed, draws, nodes = job
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        outputs = simulate({**keys, "output-dir": folder}, nodes)
        scores = posterior_scores(folder, seed, draws)
    # The server's own score of the last global: the same split and network give the same NLL.
    server_nll = outputs.results["rounds"][-1]["nll"]
    return {"seed": seed, "keys": keys, "seconds": time.perf_counter() - started,
            "server_nll": server_nll, **scores}


def markdown_table(runs: list[dict[str, Any]], title: str) -> str:
    head = ["seed", "acc %", "best logit divisor", "mean NLL", "BMA NLL", "BMA vs mean",
            "BMA NLL, precision x2 / x4"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        gap = run["bma_nll_x1"] / run["mean_nll"] - 1
        lines.append("| " + " | ".join([
            str(run["seed"]), f"{run['accuracy'] * 100:.1f}", f"{run['best_divisor']:g}",
            f"{run['mean_nll']:.4f}", f"{run['bma_nll_x1']:.4f}", f"{gap * 100:+.1f}%",
            " / ".join(f"{run[f'bma_nll_x{s:g}']:.4f}" for s in PRECISION_SCALES),
        ]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    parser = benchmark_parser(__doc__, "smoke run: 1 seed, 2 rounds, 4 clients, 8 draws")
    add_seeds_and_rounds(parser)
    parser.add_argument("--draws", type=int, help="BMA weight draws (default 512)")
    parser.add_argument("--variant", nargs="*", default=[], metavar="KEY=VALUE",
                        help="run-config keys on top of the defaults (TOML values)")
    add_jobs(parser)
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    args.seeds = args.seeds if args.seeds is not None else defaults["seeds"]
    args.rounds = args.rounds or defaults["rounds"]
    args.draws = args.draws or defaults["draws"]
    args.nodes = defaults["nodes"]
    return args


def variant_keys(pairs: list[str]) -> dict[str, Any]:
    import tomllib

    return tomllib.loads("\n".join(pairs)) if pairs else {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    extra = variant_keys(args.variant)
    jobs = [
        ({"strategy": "bayes-admm", "optimizer": "ivon", **DATA, "num-server-rounds": args.rounds,
          "seed": seed, "fraction-evaluate": 0.0, **extra}, seed, args.draws, args.nodes)
        for seed in args.seeds
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(_run, jobs))
    title = f"BayesADMM defaults{' + ' + ', '.join(args.variant) if args.variant else ''}, " \
            f"{args.rounds} rounds, {args.draws} draws"
    meta = {"command": command_line("bma_gap.py", argv), "machine": machine(),
            "wall_seconds": time.perf_counter() - started}
    text = (markdown_table(runs, title) + f"\n\n`{meta['command']}` on {meta['machine']}, "
            f"{meta['wall_seconds'] / 60:.1f} min.\n")
    save_report(args.out, "bma-gap", text, json.dumps(rounded({**meta, "runs": runs}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
