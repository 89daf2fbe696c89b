"""The server's view of personalized evaluation: per-node scores summarized, and a plot.

Every node asked to evaluate in a personal round (client_app/personal.py) replies with the
global model's and its personal model's accuracy, NLL and ECE on its own test split. Nodes
differ in what they hold, so three summaries per model: the example-weighted mean, the mean over
nodes, and the mean over the worst 10% of nodes (lowest accuracy, highest NLL and ECE).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message

from server_app.figures import new_figure, save_figure
from task import records
from task.personal import worst_share_mean

PERSONAL_PLOT = "personal.png"
METRICS = ("accuracy", "nll", "ece")
# Reply key prefix of each model a node scores.
MODELS = {"global": "", "personal": "personal-", "personal_bma": "personal-bma-"}
WORST_SHARE = 0.1


def personal_summary(replies: Iterable[Message]) -> dict[str, Any] | None:
    """Weighted mean, node mean and worst-10% mean of each model's metrics over the replies that
    carry personal scores; None when none does (not a personal round)."""
    scored = []
    for reply in replies:
        if reply.has_error():
            continue
        metrics = reply.content.metric_records.get(records.METRICS)
        if metrics is None or "personal-accuracy" not in metrics:
            continue
        count = metrics.get(records.NUM_EXAMPLES)
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            continue
        scored.append(metrics)
    if not scored:
        return None
    weights = np.array([float(m[records.NUM_EXAMPLES]) for m in scored])
    summary: dict[str, Any] = {
        "nodes": len(scored),
        "nodes_with_personal_model": int(sum(int(m.get("personal-trained", 0)) for m in scored)),
    }
    for model, prefix in MODELS.items():
        if not all(f"{prefix}accuracy" in m for m in scored):
            continue
        stats = {}
        for metric in METRICS:
            values = [float(m[f"{prefix}{metric}"]) for m in scored]
            stats[metric] = {
                "weighted": float(np.dot(values, weights) / weights.sum()),
                "node_mean": float(np.mean(values)),
                "worst10": worst_share_mean(values, WORST_SHARE, higher_is_worse=metric != "accuracy"),
            }
        summary[model] = stats
    if all("personal-w" in m for m in scored):
        summary["w_node_mean"] = float(np.mean([float(m["personal-w"]) for m in scored]))
    return summary


def plot_personal(rounds: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Client-test accuracy per personal round, global vs personal (node mean, worst 10%)."""
    scored = [r for r in rounds if r.get("personalization")]
    if not scored:
        return None
    fig, axes = new_figure(2, (10, 4))
    from matplotlib.ticker import MaxNLocator

    x = [r["round"] for r in scored]
    for ax, metric in zip(axes, ("accuracy", "nll")):
        for i, (model, style) in enumerate((("global", "o"), ("personal", "s"), ("personal_bma", "^"))):
            if model not in scored[-1]["personalization"]:
                continue
            for stat, line in (("node_mean", "-"), ("worst10", ":")):
                ax.plot(
                    x, [r["personalization"][model][metric][stat] for r in scored], color=f"C{i}",
                    marker=style, linestyle=line, label=f"{model} ({stat.replace('_', ' ')})",
                )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(f"client test {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, f"{title}: global vs personal models on the nodes' test splits")
    return path
