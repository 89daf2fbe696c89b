"""Attacks: one hostile node of ten against FedAvg, FedPA and BayesADMM, under every defence
setting (issue 14, item 3).

Digits, Dirichlet(0.5) label skew, 10 nodes, every node sampled every round; node 1 is hostile:
the real ClientApp trains it honestly, then `HostileGrid` rewrites its train reply before the
server sees it (evaluate replies are left alone; the accuracy reported is the server's own, on
its own test split). The attacks are pure functions of the honest reply and the global the node
was sent (`ATTACKS`); each strategy and optimizer runs with its defaults (as in
benchmarks/defaults.py), only the defence keys change (`DEFENCES`).

Reported per strategy, attack and defence: server test accuracy and NLL of the mean prediction,
averaged over the last 3 rounds and then over seeds, whether every run completed (an exception
is a crash), and the cost in accuracy points against the honest run with defaults.

    python benchmarks/attacks.py --jobs 2      # the full benchmark (2 seeds, 20 rounds)
    python benchmarks/attacks.py --quick       # smoke run: 1 seed, 3 rounds, defaults and recommended

Writes attacks.md and attacks.json to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    add_jobs, add_seeds_and_rounds, benchmark_parser, command_line, machine, mean_std,
    save_report, start_worker,
)
from benchmarks.inprocess import InProcessGrid  # noqa: E402

NUM_NODES = 10
HOSTILE_NODE = 1
LAST_ROUNDS = 3  # final metrics: the mean of the last rounds
DATA = {
    "dataset": "digits", "partitioner": "dirichlet", "dirichlet-alpha": 0.5,
    # Every node every round (so the hostile one too); 5 is the least the robust combiners
    # need for f = 1 and one reply trimmed at each end, and it changes nothing while all reply.
    "fraction-train": 1.0, "min-train-nodes": 5,
    "fraction-evaluate": 0.0,  # no client-side evaluation: the server's own test split decides
}
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg", "optimizer": "sgd"},
    "fedpa": {"strategy": "fedpa", "optimizer": "sgd"},
    "bayes-admm": {"strategy": "bayes-admm", "optimizer": "ivon"},
}

# ------------------------------------------------------------------------------ the attacks

INFLATED_COUNT = 10**9
BOOST = NUM_NODES  # model replacement: the update scaled by n undoes the 1/n of the mean
SIGN_FLIP_SCALE = NUM_NODES
NOISE_STD = 10.0  # per coordinate; the MLP's initial weights are about 0.1
HIJACK_PRECISION = 1e30
HIJACK_MEAN = 1e30


class Reply(NamedTuple):
    """A train reply as flat float64 vectors. `model` is the weights it asks the global to move
    to (FedAvg: theta_k; FedPA: theta + Delta_k, the global a lone Delta_k would give; BayesADMM:
    the mean m_k); `precision` is BayesADMM's S_k, None otherwise."""

    model: np.ndarray
    precision: np.ndarray | None
    num_examples: int


def target_model(global_model: np.ndarray) -> np.ndarray:
    """The attacker's target: the zero model (every class equally likely, 10% accuracy)."""
    return np.zeros_like(global_model)


def weight_inflation(honest: Reply, global_model: np.ndarray, rng: np.random.Generator) -> Reply:
    """The target model with a huge example count."""
    return honest._replace(model=target_model(global_model), num_examples=INFLATED_COUNT)


def model_replacement(honest: Reply, global_model: np.ndarray, rng: np.random.Generator) -> Reply:
    """An honest count with the update toward the target boosted x BOOST (Bagdasaryan et al.):
    under a plain mean of n replies the global lands near the target."""
    return honest._replace(model=global_model + BOOST * (target_model(global_model) - global_model))


def sign_flip(honest: Reply, global_model: np.ndarray, rng: np.random.Generator) -> Reply:
    """The honest update negated and scaled x SIGN_FLIP_SCALE."""
    return honest._replace(model=global_model - SIGN_FLIP_SCALE * (honest.model - global_model))


def gaussian_noise(honest: Reply, global_model: np.ndarray, rng: np.random.Generator) -> Reply:
    """An update of pure noise, N(0, NOISE_STD^2) per coordinate."""
    return honest._replace(model=global_model + rng.normal(0.0, NOISE_STD, global_model.shape))


def precision_hijack(honest: Reply, global_model: np.ndarray, rng: np.random.Generator) -> Reply:
    """BayesADMM: the target as mean with precision 1e30, which pins an unbounded global there."""
    return honest._replace(
        model=target_model(global_model), precision=np.full_like(honest.precision, HIJACK_PRECISION)
    )


def mean_hijack(honest: Reply, global_model: np.ndarray, rng: np.random.Generator) -> Reply:
    """BayesADMM: mean 1e30 with precision 1."""
    return honest._replace(
        model=np.full_like(global_model, HIJACK_MEAN), precision=np.ones_like(honest.precision)
    )


Attack = Callable[[Reply, np.ndarray, np.random.Generator], Reply]
GENERIC_ATTACKS: dict[str, Attack] = {
    "weight-inflation": weight_inflation,
    "model-replacement": model_replacement,
    "sign-flip": sign_flip,
    "gaussian-noise": gaussian_noise,
}
BAYES_ADMM_ATTACKS: dict[str, Attack] = {
    "precision-hijack": precision_hijack,
    "mean-hijack": mean_hijack,
}
ATTACKS: dict[str, Attack] = GENERIC_ATTACKS | BAYES_ADMM_ATTACKS
HONEST = "none"


def attacks_for(strategy: str) -> list[str]:
    extra = list(BAYES_ADMM_ATTACKS) if strategy == "bayes-admm" else []
    return [HONEST, *GENERIC_ATTACKS, *extra]


# ----------------------------------------------------------------------------- the defences

DEFAULTS = "defaults"
RECOMMENDED = "recommended"
# Fixed clip norm: about the median honest update norm of these runs (FedAvg: 1-5 in the first
# rounds, about 1 later; the adaptive rule starts here and tracks the median itself).
CLIP_NORM = 2.0
# FedAvg and FedPA: each setting of strategies/robust.py alone, then the combination picked by
# this benchmark's measurement (docs/BENCHMARKS.md, "Attacks").
ROBUST_DEFENCES: dict[str, dict[str, Any]] = {
    DEFAULTS: {},
    "max-client-weight=0.2": {"max-client-weight": 0.2},
    f"clip-norm={CLIP_NORM:g}": {"clip-norm": CLIP_NORM},
    "clip-norm adaptive": {"clip-norm": CLIP_NORM, "clip-norm-adaptive": True},
    "trimmed-mean": {"aggregation": "trimmed-mean"},
    "median": {"aggregation": "median"},
    "krum": {"aggregation": "krum"},
    "multi-krum": {"aggregation": "multi-krum"},
    RECOMMENDED: {"aggregation": "multi-krum", "max-client-weight": 0.2},
}
BAYES_ADMM_DEFENCES: dict[str, dict[str, Any]] = {
    DEFAULTS: {},
    "precision-ratio-bound=100": {"precision-ratio-bound": 100.0},
    "precision-ratio-bound=100, mean-shift-bound=10": {
        "precision-ratio-bound": 100.0, "mean-shift-bound": 10.0,
    },
    "mean-shift-bound=10": {"mean-shift-bound": 10.0},  # the recommendation before multi-krum
    "multi-krum": {"aggregation": "multi-krum"},
    "multi-krum, mean-shift-bound=10": {"aggregation": "multi-krum", "mean-shift-bound": 10.0},
    # The smallest worst-case cost measured (docs/BENCHMARKS.md): multi-krum's row.
    RECOMMENDED: {"aggregation": "multi-krum"},
}


# FedPA's sign flip on seed 1 costs 2.5 points under FedAvg's recommendation, 1.3 under the
# trimmed mean, whose worst on seed 0 is 0.5 (docs/BENCHMARKS.md, "Attacks").
FEDPA_DEFENCES: dict[str, dict[str, Any]] = {
    **ROBUST_DEFENCES, RECOMMENDED: {"aggregation": "trimmed-mean"},
}


def defences_for(strategy: str) -> dict[str, dict[str, Any]]:
    return {"bayes-admm": BAYES_ADMM_DEFENCES, "fedpa": FEDPA_DEFENCES}.get(
        strategy, ROBUST_DEFENCES
    )


# -------------------------------------------------------------------------- the hostile node


def _flat(record) -> np.ndarray:
    from task.params import flatten, record_to_numpy

    return flatten(record_to_numpy(record)).astype(np.float64)


def hostile_reply(message, reply, attack: Attack, strategy: str, rng: np.random.Generator):
    """`reply` (the honest answer to the train `message`) rewritten by `attack`."""
    from flwr.app import Message, MetricRecord, RecordDict

    from task import records
    from task.params import numpy_to_record, record_to_numpy, unflatten

    sent, answer = message.content.array_records, reply.content.array_records
    like = record_to_numpy(answer[records.ARRAYS])
    global_model = _flat(sent[records.ARRAYS])
    model = _flat(answer[records.ARRAYS])
    if strategy == "fedpa":  # the reply is the delta itself
        model = global_model + model
    metrics = reply.content.metric_records[records.METRICS]
    honest = Reply(
        model,
        _flat(answer[records.PRECISION]) if records.PRECISION in answer else None,
        int(metrics[records.NUM_EXAMPLES]),
    )
    hostile = attack(honest, global_model, rng)
    model = hostile.model - global_model if strategy == "fedpa" else hostile.model
    content = RecordDict(dict(reply.content.items()))
    with np.errstate(over="ignore"):  # 1e30 stays finite in float32; the product is the sender's
        content[records.ARRAYS] = numpy_to_record(unflatten(model, like))
        if hostile.precision is not None:
            content[records.PRECISION] = numpy_to_record(unflatten(hostile.precision, like))
    content[records.METRICS] = MetricRecord(
        {**dict(metrics), records.NUM_EXAMPLES: hostile.num_examples}
    )
    return Message(content, reply_to=message)


class HostileGrid(InProcessGrid):
    """The in-process federation with node `HOSTILE_NODE`'s train replies rewritten by `attack`
    (its ClientApp still trains, keeps its state and answers everything else honestly)."""

    def __init__(self, run_config: dict[str, Any], num_nodes: int, attack: str, seed: int) -> None:
        super().__init__(run_config, num_nodes)
        self.attack = ATTACKS[attack]
        self.strategy = run_config["strategy"]
        self.rng = np.random.default_rng(seed)

    def _deliver(self, message):
        from flwr.app import MessageType

        reply = super()._deliver(message)
        if (message.metadata.dst_node_id != HOSTILE_NODE
                or message.metadata.message_type != MessageType.TRAIN or reply.has_error()):
            return reply
        return hostile_reply(message, reply, self.attack, self.strategy, self.rng)


# ------------------------------------------------------------------------------- the runs


class Job(NamedTuple):
    strategy: str
    attack: str
    defence: str
    seed: int
    overrides: dict[str, Any]


def jobs_for(strategies: list[str], attacks: list[str] | None, defences: list[str] | None,
             seeds: list[int], rounds: int) -> list[Job]:
    jobs = []
    for strategy in strategies:
        for defence, keys in defences_for(strategy).items():
            if defences is not None and defence not in defences:
                continue
            for attack in attacks_for(strategy):
                if attacks is not None and attack not in attacks and attack != HONEST:
                    continue
                for seed in seeds:
                    overrides = {**STRATEGIES[strategy], **DATA, **keys,
                                 "num-server-rounds": rounds, "seed": seed, "eval-mc-samples": 4}
                    jobs.append(Job(strategy, attack, defence, seed, overrides))
    return jobs


def run_job(job: Job) -> dict:
    """One federation (in a worker process): per-round server metrics, or the crash."""
    start_worker(logging.ERROR)
    from benchmarks.inprocess import simulate

    started = time.perf_counter()
    if job.attack == HONEST:
        make_grid = InProcessGrid
    else:
        make_grid = functools.partial(HostileGrid, attack=job.attack, seed=job.seed)
    out: dict[str, Any] = {**job._asdict(), "completed": False, "error": None, "rounds": []}
    try:
        with tempfile.TemporaryDirectory() as folder:
            outputs = simulate({**job.overrides, "output-dir": folder}, NUM_NODES, make_grid)
        out["rounds"] = [
            {"round": r["round"], "accuracy": _number(r.get("accuracy")),
             "nll": _number(r.get("nll")), "skipped": r["skipped"], "rejected": r["rejected"],
             "problems": len(r["problems"])}
            for r in outputs.results["rounds"]
        ]
        out["completed"] = True
    except Exception as err:  # a crash is a result here, not a failure of the benchmark
        out["error"] = "".join(traceback.format_exception_only(err)).strip()[-500:]
    out["seconds"] = time.perf_counter() - started
    return out


def _number(value: Any) -> float:
    """A metric as a float; results.json writes non-finite numbers as null."""
    return math.nan if value is None else float(value)


def final(run: dict, key: str) -> float:
    values = [r[key] for r in run["rounds"][-LAST_ROUNDS:]]
    if not values:
        return math.nan
    return sum(values) / len(values)


# ------------------------------------------------------------------------------- the report


def summarize(runs: list[dict]) -> dict[str, dict[str, dict[str, dict]]]:
    """strategy -> defence -> attack -> accuracy, NLL (mean +- std over seeds), completed,
    skipped and rejected rounds, cost against the honest run with defaults (points)."""
    summary: dict[str, dict[str, dict[str, dict]]] = {}
    for run in runs:
        summary.setdefault(run["strategy"], {}).setdefault(run["defence"], {}).setdefault(
            run["attack"], {"runs": []})["runs"].append(run)
    for strategy, by_defence in summary.items():
        for by_attack in by_defence.values():
            for cell in by_attack.values():
                cell_runs = cell.pop("runs")
                done = [r for r in cell_runs if r["completed"]]
                cell["completed"] = len(done) == len(cell_runs)
                cell["seeds"] = sorted(r["seed"] for r in cell_runs)
                cell["errors"] = [r["error"] for r in cell_runs if r["error"]]
                cell["skipped_rounds"] = sum(sum(x["skipped"] for x in r["rounds"]) for r in done)
                cell["rejected_replies"] = sum(sum(x["rejected"] for x in r["rounds"]) for r in done)
                # Replies the server logged a problem with: rejected, or (BayesADMM) clipped.
                cell["flagged_replies"] = sum(sum(x["problems"] for x in r["rounds"]) for r in done)
                for key in ("accuracy", "nll"):
                    cell[key] = (mean_std([final(r, key) for r in done]) if done
                                 else {"mean": math.nan, "std": math.nan})
        reference = by_defence.get(DEFAULTS, {}).get(HONEST)
        for by_attack in by_defence.values():
            for cell in by_attack.values():
                cell["cost_points"] = (
                    100 * (reference["accuracy"]["mean"] - cell["accuracy"]["mean"])
                    if reference is not None else math.nan
                )
    return summary


def _cell(cell: dict | None) -> str:
    if cell is None:
        return ""
    if not cell["completed"]:
        return "**crashed**"
    accuracy, nll = cell["accuracy"], cell["nll"]
    text = f"{accuracy['mean'] * 100:.1f} / {nll['mean']:.3g}"
    return text + (f" ({cell['skipped_rounds']} skipped)" if cell["skipped_rounds"] else "")


def markdown(summary: dict, seeds: list[int]) -> str:
    sections = []
    for strategy in [s for s in STRATEGIES if s in summary]:
        by_defence = {d: summary[strategy][d] for d in defences_for(strategy)
                      if d in summary[strategy]}
        attacks = [a for a in attacks_for(strategy) if any(a in c for c in by_defence.values())]
        head = ["defence", "seeds", *attacks, "worst cost (points)"]
        lines = [f"### {strategy}", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for defence, by_attack in by_defence.items():
            costs = [by_attack[a]["cost_points"] if by_attack[a]["completed"] else math.inf
                     for a in attacks if a in by_attack and a != HONEST]
            worst = f"{max(costs):.1f}" if costs else ""
            seeds = sorted({seed for cell in by_attack.values() for seed in cell["seeds"]})
            lines.append("| " + " | ".join(
                [defence, ",".join(map(str, seeds)), *(_cell(by_attack.get(a)) for a in attacks),
                 worst]) + " |")
        sections.append("\n".join(lines))
    return ("\n\n".join(sections)
            + f"\n\nCells: test accuracy % / NLL, mean of the last {LAST_ROUNDS} rounds, mean over "
            f"the row's seeds (of {seeds}). Worst cost: the largest accuracy loss of an attack against the "
            f"honest run with defaults (first cell of the defaults row), in points.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(
        __doc__, "smoke run: 1 seed, 3 rounds, FedAvg and BayesADMM, defaults and recommended"
    )
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES))
    parser.add_argument("--attacks", nargs="+", choices=list(ATTACKS),
                        help="attacks to run (the honest run always runs)")
    parser.add_argument("--defences", nargs="+",
                        choices=sorted(set(ROBUST_DEFENCES) | set(BAYES_ADMM_DEFENCES)))
    add_seeds_and_rounds(parser)
    add_jobs(parser)
    parser.add_argument("--merge", action="store_true",
                        help="keep the runs of --out's attacks.json that this call does not redo "
                        "(to add seeds or settings)")
    args = parser.parse_args(argv)
    if args.quick:
        args.strategies = args.strategies or ["fedavg", "bayes-admm"]
        args.defences = args.defences or [DEFAULTS, RECOMMENDED]
    args.strategies = args.strategies or list(STRATEGIES)
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    args.rounds = args.rounds or (3 if args.quick else 20)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the worker processes
    started = time.perf_counter()
    jobs = jobs_for(args.strategies, args.attacks, args.defences, args.seeds, args.rounds)
    print(f"{len(jobs)} federations ({args.rounds} rounds), {args.jobs} at once", flush=True)
    runs = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for run in pool.map(run_job, jobs):
            status = (f"acc {final(run, 'accuracy'):.4f} nll {final(run, 'nll'):.4g}"
                      if run["completed"] else f"CRASHED {run['error']}")
            print(f"  {run['strategy']:10s} {run['defence']:26s} {run['attack']:18s} seed "
                  f"{run['seed']}: {status} ({run['seconds']:.0f} s)", flush=True)
            runs.append(run)
    commands, seeds = [command_line("attacks.py", argv)], sorted(args.seeds)
    if args.merge and (args.out / "attacks.json").exists():
        earlier = json.loads((args.out / "attacks.json").read_text())
        redone = {_key(run) for run in runs}
        runs = [_unstrict(r) for r in earlier["runs"] if _key(r) not in redone] + runs
        commands = earlier["commands"] + commands
        seeds = sorted({run["seed"] for run in runs})
    summary = summarize(runs)
    results = {
        "commands": commands, "data": DATA, "num_nodes": NUM_NODES,
        "hostile_node": HOSTILE_NODE, "rounds": args.rounds, "seeds": seeds,
        "defences": {s: defences_for(s) for s in args.strategies},
        "machine": machine(), "wall_seconds": time.perf_counter() - started,  # this call's
        "summary": summary, "runs": runs,
    }
    text = (f"# Attacks: 1 hostile node of {NUM_NODES}\n\n"
            + "".join(f"`{c}`\n" for c in commands)
            + f"\ndigits, Dirichlet(0.5), {NUM_NODES} nodes, node {HOSTILE_NODE} hostile every "
            f"round, {args.rounds} rounds; wall time of the last call "
            f"{results['wall_seconds'] / 60:.1f} min on {results['machine']}.\n\n"
            + markdown(summary, seeds) + "\n")
    save_report(
        args.out, "attacks", text,
        json.dumps(_strict(results), separators=(",", ":"), allow_nan=False),
    )
    print(f"Wrote {args.out / 'attacks.md'} and attacks.json")
    return 0


def _key(run: dict) -> tuple:
    return run["strategy"], run["attack"], run["defence"], run["seed"]


def _unstrict(run: dict) -> dict:
    """A run read back from attacks.json: null metrics are NaN again."""
    rounds = [{**r, "accuracy": _number(r["accuracy"]), "nll": _number(r["nll"])}
              for r in run["rounds"]]
    return {**run, "rounds": rounds}


def _strict(value: Any) -> Any:
    """`value` with non-finite floats as None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


if __name__ == "__main__":
    raise SystemExit(main())
