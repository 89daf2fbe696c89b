"""IVON's two regimes on MNIST-1D's CNN, trained centrally: why the IVON methods need more than a
learning rate in their tuning grid.

One network (`model = 'cnn1d'`) trained on the MNIST-1D training pool with the client optimizers
the app builds (`client_app.optimizers.build_optimizer`, so IVON is the app's own IVON client at
rho = 1, with prior N(0, 1/prior-precision)): SGD as FedAvg's MNIST-1D preset runs it, IVON with
the small rates at hess-init 1e-3 of the digits presets, and IVON's own recipe for networks (a large
initial Hessian that beta2 near 1 keeps), at temperature 1e-3 and 1. Scored on a validation split
of 10% of the training pool every few epochs; the test set stays unseen. No federation: what is
measured is the optimizer alone.

    python benchmarks/ivon_regimes.py --jobs 2       # 3 seeds, 30 epochs (about 3 min)
    python benchmarks/ivon_regimes.py --quick        # smoke run

Writes ivon-regimes.md and ivon-regimes.json to --out.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_jobs, benchmark_parser, command_line, machine, mean_std, save_report, start_worker,
)

OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd (lr 0.03, momentum 0.9)": {"optimizer": "sgd", "lr": 0.03, "momentum": 0.9},
    "ivon, small rate (lr 3e-3, hess-init 1e-3, beta2 0.998)": {
        "optimizer": "ivon", "lr": 3e-3, "hess-init": 1e-3, "beta2": 0.998, "temperature": 1e-3},
    "ivon recipe (lr 0.2, hess-init 0.5, beta2 0.99999)": {
        "optimizer": "ivon", "lr": 0.2, "hess-init": 0.5, "beta2": 0.99999, "temperature": 1e-3},
    "ivon recipe, temperature 1": {
        "optimizer": "ivon", "lr": 0.2, "hess-init": 0.5, "beta2": 0.99999, "temperature": 1.0},
}
DATA = {"dataset": "mnist1d", "model": "cnn1d", "batch-size": 32}
VAL_FRACTION = 0.1
FULL = {"seeds": [0, 1, 2], "epochs": 30, "every": 5, "samples": 5000}
QUICK = {"seeds": [0], "epochs": 2, "every": 1, "samples": 1000}


def train(name: str, seed: int, epochs: int, every: int, samples: int) -> dict[str, Any]:
    """One network trained with optimizer `name`; validation accuracy and NLL every `every` epochs."""
    start_worker()
    import torch
    import torch.nn.functional as F

    from client_app.optimizers import build_optimizer
    from client_app.training import train_epochs
    from task.config import parse_run_config
    from task.data import data_spec, partition, server_test_set
    from task.models import build_model, seed_torch

    cfg = parse_run_config(DATA | OPTIMIZERS[name] | {
        "seed": seed, "mnist1d-samples": samples, "partitioner": "iid",
        "server-val-fraction": VAL_FRACTION})
    # One partition holds the whole training pool; with server-val-fraction the server's set is
    # the validation split carved from it.
    train_set, val_set = partition(cfg, 0, 1), server_test_set(cfg)
    vx, vy = torch.as_tensor(val_set.x), torch.as_tensor(val_set.y).long()
    seed_torch(seed)
    model = build_model(cfg, data_spec(cfg))
    optimizer = build_optimizer(cfg, model.parameters(), cfg.local_lr, len(train_set.y))
    curve, started = [], time.process_time()

    def score(epoch: int) -> None:  # train_epochs counts epochs from 0
        if (epoch + 1) % every and epoch + 1 != epochs:
            return
        with torch.no_grad():
            logits = model(vx)
        curve.append({"epoch": epoch + 1,
                      "accuracy": float((logits.argmax(1) == vy).float().mean()),
                      "nll": float(F.cross_entropy(logits, vy))})

    train_epochs(model, train_set, optimizer, epochs, cfg.batch_size, torch.device("cpu"), seed,
                 after_epoch=score)
    return {"optimizer": name, "seed": seed, "train_examples": len(train_set.y),
            "validation_examples": len(vy),
            "curve": curve, "cpu_seconds": time.process_time() - started}


def report(runs: list[dict], size: dict, command: str, wall: float) -> tuple[str, str]:
    epochs = [p["epoch"] for p in runs[0]["curve"]]
    header = " | ".join(f"acc % @{e}" for e in epochs)
    lines = [
        "# IVON's two regimes (MNIST-1D CNN, trained centrally)", "",
        f"`{command}`: {len(size['seeds'])} seed(s), {size['samples']} signals, validation split "
        f"{VAL_FRACTION:.0%} of the training pool, batch {DATA['batch-size']}; wall time "
        f"{wall / 60:.1f} min on {machine()}. Mean +- std over seeds.", "",
        f"| optimizer | {header} | NLL @{epochs[-1]} |",
        "|---|" + "---|" * (len(epochs) + 1),
    ]
    summary = {}
    for name in OPTIMIZERS:
        mine = [r["curve"] for r in runs if r["optimizer"] == name]
        acc = [mean_std([100 * c[i]["accuracy"] for c in mine]) for i in range(len(epochs))]
        nll = mean_std([c[-1]["nll"] for c in mine])
        summary[name] = {"accuracy": acc, "nll": nll}
        cells = " | ".join(f"{a['mean']:.1f} ± {a['std']:.1f}" for a in acc)
        lines.append(f"| {name} | {cells} | {nll['mean']:.3f} ± {nll['std']:.3f} |")
    data = {"command": command, "size": size, "optimizers": OPTIMIZERS, "epochs": epochs,
            "summary": summary, "runs": runs, "wall_seconds": wall, "machine": machine()}
    return "\n".join(lines) + "\n", json.dumps(data, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, "smoke run: 1 seed, 2 epochs, 1,000 signals")
    add_jobs(parser)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    command = command_line("ivon_regimes.py", argv)
    started = time.perf_counter()
    todo = [(name, seed) for seed in size["seeds"] for name in OPTIMIZERS]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(train, *zip(*todo), *([size[key]] * len(todo)
                                                     for key in ("epochs", "every", "samples"))))
    text, data = report(runs, size, command, time.perf_counter() - started)
    save_report(args.out, "ivon-regimes", text, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
