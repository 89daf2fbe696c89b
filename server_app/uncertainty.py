"""The global model's uncertainty on the server, every `uncertainty-eval-every` rounds and after
the last: out-of-distribution detection, selective prediction and calibration under covariate
shift, for the network at the global mean and, where the strategy has a posterior, for its
Bayesian model average (BMA) side by side. The numbers go into the round's results.json entry
under `uncertainty`; uncertainty.png and reliability.png plot them.

OOD and shifted inputs are built once from the server's test set (task/ood.py). The BMA draws
the same weights for every input set (one seed), so the sets are compared on the same models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from server_app.figures import new_figure, save_figure
from task.config import RunConfig
from task.data import ArrayData
from task.metrics import classification_metrics, predict_probs, reliability_bins
from task.ood import ood_sets, shifted_sets
from task.params import load_record, record_to_numpy
from task.predict import bma_probs
from task.uncertainty import (
    aurc,
    mutual_information,
    ood_auroc,
    predictive_entropy,
    selective_accuracy,
)

COVERAGES = (0.8, 0.9)
# model.json keeps the final test-set entropy at coverages 0, 0.01, ..., 1: `bayesfl predict
# --coverage` turns a target coverage into an entropy threshold without the test set.
QUANTILE_POINTS = 101


@dataclass(frozen=True)
class Predictive:
    """Class probabilities of one predictive on one input set, and the mutual information
    between prediction and weights (None for the network at the mean: one set of weights)."""

    probs: np.ndarray
    mutual_information: np.ndarray | None = None

    @property
    def entropy(self) -> np.ndarray:
        return predictive_entropy(self.probs)


def predictive_metrics(
    test: Predictive, ood: dict[str, Predictive], shifted: dict[str, Predictive], labels: np.ndarray
) -> dict[str, Any]:
    """One predictive's uncertainty numbers: OOD AUROC of its entropy (and of its mutual
    information), selective accuracy at COVERAGES and AURC on the test set (abstaining on the
    highest entropy first), accuracy/NLL/ECE under each shift, and the test set's reliability bins
    (empty bins as null)."""
    correct = test.probs.argmax(axis=1) == labels
    metrics: dict[str, Any] = {
        "ood_auroc_entropy": {k: ood_auroc(test.entropy, p.entropy) for k, p in ood.items()}
    }
    if test.mutual_information is not None:
        metrics["ood_auroc_mi"] = {
            k: ood_auroc(test.mutual_information, p.mutual_information) for k, p in ood.items()
        }
    for coverage in COVERAGES:
        key = f"selective_accuracy_{round(coverage * 100)}"
        metrics[key] = selective_accuracy(correct, test.entropy, coverage)
    metrics["aurc"] = aurc(correct, test.entropy)
    metrics["shift"] = {k: classification_metrics(p.probs, labels) for k, p in shifted.items()}
    share, accuracy, confidence = reliability_bins(test.probs, labels)
    metrics["reliability"] = {
        "share": share.tolist(),
        "accuracy": [None if np.isnan(v) else float(v) for v in accuracy],
        "confidence": [None if np.isnan(v) else float(v) for v in confidence],
    }
    return metrics


def entropy_quantiles(entropy: np.ndarray) -> list[float] | None:
    """The entropy at coverages 0, 0.01, ..., 1; None unless every entropy is finite."""
    if not len(entropy) or not np.isfinite(entropy).all():
        return None
    return np.quantile(entropy, np.linspace(0.0, 1.0, QUANTILE_POINTS)).tolist()


@dataclass(frozen=True)
class UncertaintyReport:
    metrics: dict[str, Any]  # {"mean": {...}, "bma": {...}} for the round's entry
    predictive: str  # the one `bayesfl predict` uses: "bma" with a posterior, else "mean"
    test_entropy_quantiles: list[float] | None  # its test-set entropy at coverages 0..1


class UncertaintyEvaluation:
    """Evaluates the global model's uncertainty on the test set and its OOD and shifted copies."""

    def __init__(self, cfg: RunConfig, test: ArrayData) -> None:
        self.cfg, self.test = cfg, test

    # Built at the first evaluation, not before: they hold as many inputs as the test set each.
    @cached_property
    def ood(self) -> dict[str, np.ndarray]:
        return ood_sets(self.cfg.dataset, self.test.x, self.cfg.seed)

    @cached_property
    def shifted(self) -> dict[str, np.ndarray]:
        return shifted_sets(self.test.x, self.cfg.seed)

    def due(self, server_round: int) -> bool:
        every = self.cfg.uncertainty_eval_every
        return server_round == self.cfg.num_server_rounds or (
            every > 0 and server_round % every == 0
        )

    def __call__(
        self,
        model: nn.Module,
        arrays: ArrayRecord,
        posterior: tuple[ArrayRecord, ArrayRecord] | None,
        device: torch.device,
        seed: int,
        temperature: float = 1.0,
    ) -> UncertaintyReport:
        load_record(model, arrays)
        net = model.to(device)
        mean = self._evaluate(lambda x: Predictive(predict_probs(net, x, device, temperature=temperature)))
        metrics = {"mean": predictive_metrics(*mean, self.test.y)}
        chosen = mean[0]
        if posterior is not None:
            weights, precision = (record_to_numpy(r) for r in posterior)

            def bma(x: np.ndarray) -> Predictive:
                probs, _, expected = bma_probs(
                    model, weights, precision, x, device, self.cfg.eval_mc_samples, seed, temperature
                )
                return Predictive(probs, mutual_information(probs, expected))

            bma_sets = self._evaluate(bma)
            metrics["bma"] = predictive_metrics(*bma_sets, self.test.y)
            chosen = bma_sets[0]
        return UncertaintyReport(
            metrics, "bma" if posterior is not None else "mean", entropy_quantiles(chosen.entropy)
        )

    def _evaluate(
        self, predictive: Callable[[np.ndarray], Predictive]
    ) -> tuple[Predictive, dict[str, Predictive], dict[str, Predictive]]:
        """`predictive` on the test set, on each OOD set and on each shifted set."""
        return (
            predictive(self.test.x),
            {k: predictive(x) for k, x in self.ood.items()},
            {k: predictive(x) for k, x in self.shifted.items()},
        )


# ----------------------------------------------------------------------------- plots


def plot_uncertainty(rounds: list[dict[str, Any]], path: Path, title: str) -> bool:
    """uncertainty.png: OOD AUROC and selective accuracy over the evaluated rounds, and NLL
    and ECE against the shift level at the last one; False (nothing written) without any."""
    evaluated = [r for r in rounds if r.get("uncertainty")]
    if not evaluated:
        return False
    x = [r["round"] for r in evaluated]
    last = evaluated[-1]
    predictives = [p for p in ("mean", "bma") if p in last["uncertainty"]]
    fig, axes = new_figure(4, (18, 4))
    styles = {"mean": "-", "bma": "--"}
    oods = list(last["uncertainty"]["mean"]["ood_auroc_entropy"])
    colors = {ood: f"C{i}" for i, ood in enumerate(oods)}
    for name in predictives:
        label = "mean prediction" if name == "mean" else "BMA"
        for score in ("entropy", "mi"):
            key = f"ood_auroc_{score}"
            for ood in last["uncertainty"][name].get(key, {}):
                values = [r["uncertainty"].get(name, {}).get(key, {}).get(ood) for r in evaluated]
                marker = "o" if score == "entropy" else "^"
                axes[0].plot(x, values, styles[name], marker=marker, color=colors[ood],
                             label=f"{ood}: {label} {score}")
        for coverage in COVERAGES:
            key = f"selective_accuracy_{round(coverage * 100)}"
            values = [r["uncertainty"].get(name, {}).get(key) for r in evaluated]
            axes[1].plot(x, values, styles[name], marker="o", label=f"{label} @{coverage:.0%}")
        levels = list(last["uncertainty"][name]["shift"])
        shift = last["uncertainty"][name]["shift"]
        noise = [0.0] + [float(level) for level in levels]
        for ax, metric in zip(axes[2:], ("nll", "ece")):
            clean = last.get(metric if name == "mean" else f"bma_{metric}")
            ax.plot(noise, [clean] + [shift[level][metric] for level in levels], styles[name],
                    marker="o", label=label)
    from matplotlib.ticker import MaxNLocator

    for ax in axes[:2]:  # the evaluated rounds themselves, when few
        if len(x) <= 10:
            ax.set_xticks(x)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set(xlabel="round", ylabel="OOD AUROC", title="OOD detection")
    axes[1].set(xlabel="round", ylabel="accuracy", title="selective prediction")
    for ax, metric in zip(axes[2:], ("NLL", "ECE")):
        ax.set(xlabel="noise std / test std", ylabel=metric,
               title=f"covariate shift, round {last['round']}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, f"{title}: uncertainty of the global model")
    return True


def plot_reliability(rounds: list[dict[str, Any]], path: Path, title: str) -> bool:
    """reliability.png: accuracy against confidence per bin on the test set for the last
    evaluated global model; False (nothing written) without any."""
    evaluated = [r for r in rounds if r.get("uncertainty")]
    if not evaluated:
        return False
    last = evaluated[-1]
    predictives = [p for p in ("mean", "bma") if p in last["uncertainty"]]
    fig, axes = new_figure(len(predictives), (5 * len(predictives), 4.5), squeeze=False)
    for ax, name in zip(axes[0], predictives):
        bins = last["uncertainty"][name]["reliability"]
        count = len(bins["share"])
        edges = np.linspace(0.0, 1.0, count + 1)
        accuracy = [np.nan if v is None else v for v in bins["accuracy"]]
        ax.bar(edges[:-1], accuracy, width=1.0 / count, align="edge", edgecolor="black",
               alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ece = last.get("ece" if name == "mean" else "bma_ece")
        label = "mean prediction" if name == "mean" else "BMA"
        ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
               title=f"{label} (ECE {ece:.3f})" if ece is not None else label)
        ax.legend(loc="upper left")
    save_figure(fig, path, f"{title}: reliability on the test set, round {last['round']}")
    return True
