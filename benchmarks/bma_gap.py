"""Where BayesADMM's Bayesian model average stands against its mean prediction, and why.

For each run (BayesADMM with IVON on its defaults, digits Dirichlet(0.1), 10 clients; variants
by --variant key=value), one in-process federation, then its final global posterior is scored on
the run's own test split over --draws weight draws (more draws shrink only the Monte Carlo
error): the mean network's and the BMA's NLL raw (temperature 1), at the temperature the run
fitted on its nodes' held-out splits (`predictive-temperature = "auto"`, what the run reports)
and at the test split's own best temperature (a diagnostic: below 1, the mean network is
underconfident), and the BMA at precision x2 and x4 (narrower posteriors).

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
PRECISION_SCALES = (2.0, 4.0)
QUICK = {"seeds": [0], "rounds": 2, "draws": 8, "nodes": 4}
FULL = {"seeds": [0, 1, 2], "rounds": 30, "draws": 512, "nodes": NUM_NODES}


def _bma_probs_by_temperature(net, mean, precision, x, draws: int, seed: int):
    """The BMA's probabilities at each of TEMPERATURES over the same `draws` weight draws."""
    import numpy as np
    import torch

    from task.metrics import TEMPERATURES, predict_probs, tempered
    from task.params import load_record, numpy_to_record

    rng = np.random.default_rng(seed)
    sums = {t: 0.0 for t in TEMPERATURES}
    for _ in range(draws):
        load_record(net, numpy_to_record({
            k: (m + rng.standard_normal(m.shape) / np.sqrt(precision[k])).astype(m.dtype)
            for k, m in mean.items()
        }))
        probs = predict_probs(net, x, torch.device("cpu"))
        sums = {t: sums[t] + tempered(probs, t) for t in TEMPERATURES}
    return {t: sums[t] / draws for t in TEMPERATURES}


def _example_nll(probs, labels):
    import numpy as np

    return -np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12))


def posterior_scores(folder: str, seed: int, draws: int) -> dict[str, Any]:
    """For the run saved in `folder`: the temperature it fitted on its nodes' held-out data, and
    on its test split the mean network's and the BMA's NLL raw (T = 1), at that temperature and
    at the test split's own best temperature (a diagnostic: no run may choose it), the standard
    error of the BMA's NLL minus the mean's at the fitted temperature (paired over the test
    inputs: the gap's noise from the test set's size), and the BMA at the fitted temperature with
    the precision x2 and x4 (narrower posteriors)."""
    import numpy as np
    import torch

    from task.data import server_test_set
    from task.metrics import TEMPERATURES, nll, predict_probs, tempered
    from task.models import build_model
    from task.params import load_record, numpy_to_record
    from task.predict import load_global_model, prepare

    model = load_global_model(folder)
    # model.json keeps what predicting needs, not the run's seed: the test split needs it.
    test = server_test_set(model.cfg.model_copy(update={"seed": seed}))
    x, fitted = prepare(model, test.x), model.temperature
    net = build_model(model.cfg, model.spec)
    load_record(net, numpy_to_record(model.mean))
    probs = predict_probs(net, x, torch.device("cpu"))
    mean_nll = {t: nll(tempered(probs, t), test.y) for t in TEMPERATURES}
    bma = _bma_probs_by_temperature(net, model.mean, model.precision, x, draws, seed)
    bma_nll = {t: nll(p, test.y) for t, p in bma.items()}
    best = min(mean_nll, key=mean_nll.get)
    gap = _example_nll(bma[fitted], test.y) - _example_nll(tempered(probs, fitted), test.y)
    scores = {
        "accuracy": float((probs.argmax(1) == test.y).mean()),
        "temperature": fitted, "best_temperature": best,
        "mean_nll_t1": mean_nll[1.0], "mean_nll": mean_nll[fitted], "mean_nll_best": mean_nll[best],
        "bma_nll_t1": bma_nll[1.0], "bma_nll": bma_nll[fitted], "bma_nll_best": bma_nll[best],
        "gap_standard_error": float(gap.std(ddof=1) / np.sqrt(len(gap))),
    }
    for scale in PRECISION_SCALES:
        precision = {k: v * scale for k, v in model.precision.items()}
        narrower = _bma_probs_by_temperature(net, model.mean, precision, x, draws, seed)
        scores[f"bma_nll_x{scale:g}"] = nll(narrower[fitted], test.y)
    return scores


def _run(job: tuple[dict[str, Any], int, int, int]) -> dict[str, Any]:
    start_worker()
    from benchmarks.inprocess import simulate

    keys, seed, draws, nodes = job
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        outputs = simulate({**keys, "output-dir": folder}, nodes)
        scores = posterior_scores(folder, seed, draws)
    # The server's own score of the last global: the same split, network and temperature.
    server_nll = outputs.results["rounds"][-1]["nll"]
    return {"seed": seed, "keys": keys, "seconds": time.perf_counter() - started,
            "server_nll": server_nll, **scores}


def _gap(bma: float, mean: float) -> str:
    return f"{(bma / mean - 1) * 100:+.1f}%"


def markdown_table(runs: list[dict[str, Any]], title: str) -> str:
    head = ["seed", "acc %", "fitted T", "mean NLL, T = 1 / fitted T", "BMA NLL, T = 1 / fitted T",
            "BMA vs mean, T = 1 / fitted T", "BMA - mean at fitted T (standard error)",
            "test's best T: mean / BMA NLL",
            "BMA NLL at fitted T, precision x2 / x4"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        lines.append("| " + " | ".join([
            str(run["seed"]), f"{run['accuracy'] * 100:.1f}", f"{run['temperature']:g}",
            f"{run['mean_nll_t1']:.4f} / {run['mean_nll']:.4f}",
            f"{run['bma_nll_t1']:.4f} / {run['bma_nll']:.4f}",
            f"{_gap(run['bma_nll_t1'], run['mean_nll_t1'])} / {_gap(run['bma_nll'], run['mean_nll'])}",
            f"{run['bma_nll'] - run['mean_nll']:+.4f} ({run['gap_standard_error']:.4f})",
            f"{run['best_temperature']:g}: {run['mean_nll_best']:.4f} / {run['bma_nll_best']:.4f}",
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
          "seed": seed, **extra}, seed, args.draws, args.nodes)
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
