"""What the benchmark scripts share: their common options, a worker process's set-up, the
command line and machine a report records, statistics over seeds, and how figures and reports
are written."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def benchmark_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark script takes: --quick (the smoke run that
    `quick_help` describes) and --out (the reports' folder). `doc`'s first paragraph describes
    the script."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def add_seeds_and_rounds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--rounds", type=int)


def add_run_config(parser: argparse.ArgumentParser, help: str) -> None:
    """--run-config "key=value ..." (Flower's syntax), parsed into `args.overrides` (a dict)."""
    parser.add_argument("--run-config", dest="overrides", type=_config_args, default={}, help=help)


def _config_args(text: str) -> dict[str, Any]:
    """The keys of `text`, refused with a one-line reason when a pair is malformed or a key is
    not one of the app's (a typo would otherwise run the whole benchmark without it)."""
    from flwr.common.config import parse_config_args

    from benchmarks.inprocess import default_run_config

    try:
        keys = parse_config_args([text]) if text.strip() else {}
    except Exception as err:  # Flower raises a click exception with the expected format
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    if len(keys) != len(shlex.split(text)):
        raise argparse.ArgumentTypeError(f"{text!r}: every item must be key=value")
    unknown = sorted(set(keys) - set(default_run_config()))
    if unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown run-config key(s) {unknown}")
    return keys


def add_jobs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                        help="federations run at once, one process each")


def start_worker(flwr_level: int = logging.WARNING) -> None:
    """Set up a worker process for its federations: torch on one thread (the federations
    themselves run one per core) and Flower's log quieted."""
    import torch

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(flwr_level)


def command_line(script: str, argv: list[str] | None) -> str:
    """How `benchmarks/<script>` was called (`argv`, else this process's arguments)."""
    return f"python benchmarks/{script} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()


def machine() -> str:
    import torch

    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def mean_std(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std}


def rounded(value: Any) -> Any:
    """Floats to 6 decimals, to keep the JSON small."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def save_figure(fig: Any, path: Path) -> None:
    """Lay out a matplotlib figure, write it to `path` and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_report(out: Path, stem: str, text: str, json_text: str) -> None:
    """`<stem>.md` (the markdown `text`, also printed) and `<stem>.json` in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json_text)
    print("\n" + text)


def saved_runs(paths: list[Path], kind: str) -> tuple[list[dict], dict]:
    """The runs of a benchmark's saved JSON files (`settings` -> runs by `kind`, e.g. "method"
    or "variant"), and what they were run as: their commands, rounds and summed wall time. A run
    saved twice (same setting, `kind` and seed) counts once: the later file's."""
    runs, meta = [], {"commands": [], "rounds": set(), "wall_seconds": 0.0}
    for path in paths:
        saved = json.loads(path.read_text())
        meta["commands"].append(saved["command"])
        meta["rounds"].add(saved["rounds"])
        meta["wall_seconds"] += saved["wall_seconds"]
        runs += [run for entry in saved["settings"].values()
                 for kind_runs in entry["runs"].values() for run in kind_runs]
    runs = list({(r["setting"], r[kind], r["seed"]): r for r in runs}.values())
    if len(meta["rounds"]) != 1:
        raise SystemExit(f"--from-json: the files ran different numbers of rounds {meta['rounds']}")
    return runs, meta
