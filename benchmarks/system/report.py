"""Rows and tables: a round's row, the round summaries, bytes per round, the machine, Markdown."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import flwr
import ivon
import numpy as np
import torch

from benchmarks.system.settings import median
from task.methods import METHODS


def split_row(label: dict[str, Any], mode: str, entry: dict, timers: dict | None,
              local_training: float) -> dict[str, Any]:
    """One round: its seconds, the local training in it, and everything else."""
    seconds = entry["seconds"]
    row = {**label, "mode": mode, "round": entry["round"], "clients": entry["sampled"],
           "round_seconds": seconds, "local_training_seconds": local_training,
           "everything_else_seconds": seconds - local_training,
           "everything_else_vs_local": (seconds - local_training) / local_training,
           "bytes_down": entry["bytes_down"], "bytes_up": entry["bytes_up"]}
    if timers is not None:
        client_total = timers.get("client_train", 0.0) + timers.get("client_evaluate", 0.0)
        parts = {
            "client_handler_other_seconds": client_total - local_training,
            "server_evaluation_seconds": timers.get("server_evaluation", 0.0),
            "aggregation_seconds": timers.get("aggregation", 0.0),
            "configure_seconds": timers.get("configure", 0.0),
        }
        parts["loop_other_seconds"] = seconds - local_training - sum(parts.values())
        # Not in the round's seconds: written after them, once per round.
        parts["persist_seconds"] = timers.get("persist", 0.0)
        row |= parts
    return row


def summarize_rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per strategy and mode: medians over the rounds after the first (round 1 warms caches)."""
    keys = ["round_seconds", "local_training_seconds", "everything_else_seconds",
            "everything_else_vs_local", "client_handler_other_seconds", "server_evaluation_seconds",
            "aggregation_seconds", "configure_seconds", "loop_other_seconds", "persist_seconds"]
    out = []
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        if "round_seconds" in row:
            groups.setdefault((row["workload"], row["strategy"], row["mode"]), []).append(row)
    for (workload, strategy, mode), group in groups.items():
        later = [r for r in group if r["round"] > 1] or group
        summary = {"workload": workload, "strategy": strategy, "mode": mode, "rounds": len(later)}
        for key in keys:
            if all(key in r for r in later):
                summary[key] = median(r[key] for r in later)
        summary["first_round_seconds"] = median(r["round_seconds"] for r in group if r["round"] == 1)
        out.append(summary)
    return out


def bytes_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bytes per training round per strategy (the in-process runs; the wire payload is the same)."""
    table = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        fedavg = None
        for strategy in METHODS:  # fedavg first: the others are compared with it
            mine = [r for r in rows if r["workload"] == workload and r["strategy"] == strategy
                    and r["mode"] == "in-process"]
            if not mine:
                continue
            down, up = median(r["bytes_down"] for r in mine), median(r["bytes_up"] for r in mine)
            if strategy == "fedavg":
                fedavg = down + up
            table.append({"workload": workload, "strategy": strategy, "clients": mine[0].get("clients"),
                          "bytes_down": down, "bytes_up": up,
                          "vs_fedavg": (down + up) / fedavg if fedavg else float("nan")})
    return table


def machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": threads,
        "torch": torch.__version__, "flwr": flwr.__version__, "numpy": np.__version__,
        "ivon_opt": getattr(ivon, "__version__", "0.1.3" if hasattr(ivon, "IVON") else "?"),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def markdown(tables: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
        return str(value)

    lines = [f"Machine: {json.dumps(tables['machine'])}", ""]
    for name, rows in tables.items():
        if name == "machine" or not rows:
            continue
        columns = list(dict.fromkeys(k for row in rows for k in row))
        lines += [f"### {name}", "", "| " + " | ".join(columns) + " |",
                  "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)
