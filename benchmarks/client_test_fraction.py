"""What client-side evaluation costs: FedAvg with its defaults on digits Dirichlet(0.1), 10 nodes,
30 rounds, for several `client-test-fraction` values and seeds (in-process federation).

    python benchmarks/client_test_fraction.py --fractions 0.0 0.1 0.2 --seeds 0 1 2

Prints one Markdown table: server test accuracy and NLL at the last round (and the mean of its
last three rounds), mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.inprocess import simulate  # noqa: E402

SETTING = {"strategy": "fedavg", "dataset": "digits", "partitioner": "dirichlet",
           "dirichlet-alpha": 0.1, "num-server-rounds": 30, "device": "cpu"}


def one_run(fraction: float, seed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        rounds = simulate({**SETTING, "client-test-fraction": fraction, "seed": seed,
                           "output-dir": out}, num_nodes=10).results["rounds"]
    return {"acc": rounds[-1]["accuracy"], "nll": rounds[-1]["nll"],
            "acc3": statistics.fmean(r["accuracy"] for r in rounds[-3:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    print("| client-test-fraction | accuracy, round 30 | accuracy, rounds 28-30 | NLL, round 30 |")
    print("|---|---|---|---|")
    for fraction in args.fractions:
        runs = [one_run(fraction, seed) for seed in args.seeds]
        cells = []
        for key, fmt in (("acc", ".3f"), ("acc3", ".3f"), ("nll", ".3f")):
            values = [r[key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):{fmt}} +- {spread:{fmt}}")
        print(f"| {fraction} | " + " | ".join(cells) + " |", flush=True)
        per_seed = [round(r["acc"], 4) for r in runs]
        print(f"<!-- {fraction}: round-30 accuracy per seed {per_seed} -->", flush=True)


if __name__ == "__main__":
    main()
