"""Classification metrics on predicted class probabilities: accuracy, NLL, ECE and its
reliability bins, Brier score."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

ECE_BINS = 15
# The temperatures a run's predictive may take (`predictive-temperature = "auto"`): 2^(k/8) for
# k = -8..8, 0.5 to 2 in steps of 9%. A bounded grid also bounds what false client reports can
# do: a temperature never changes the mean network's predicted class.
TEMPERATURES = tuple(round(2.0 ** (k / 8), 4) for k in range(-8, 9))
TEMPERATURE_NLL_PREFIX = "nll-t"


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels (probabilities floored at 1e-12)."""
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12))))


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin (lo, hi] (the first also takes 0): the share of inputs in
    it, their accuracy and their mean confidence (NaN for an empty bin). A reliability diagram
    plots accuracy against confidence; ECE is their gap weighted by the share."""
    confidence = probs.max(axis=1)
    correct = np.argmax(probs, axis=1) == labels
    bin_index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    share, accuracy_in, confidence_in = np.zeros(bins), np.full(bins, np.nan), np.full(bins, np.nan)
    for b in range(bins):
        in_bin = bin_index == b
        if in_bin.any():
            share[b] = in_bin.mean()
            accuracy_in[b], confidence_in[b] = correct[in_bin].mean(), confidence[in_bin].mean()
    return share, accuracy_in, confidence_in


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over equal-width confidence bins (lo, hi]."""
    total = 0.0
    for share, accuracy_in, confidence_in in zip(*reliability_bins(probs, labels, bins)):
        if share > 0:
            total += share * abs(accuracy_in - confidence_in)
    return float(total)


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over examples of the squared distance between the probabilities and the one-hot
    label (summed over classes: 0 is perfect, 2 the worst)."""
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "ece": ece(probs, labels),
        "brier": brier(probs, labels),
    }


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from the probabilities softmax(logits): log p differs from the logits
    by a constant per input, which the softmax removes."""
    logits = np.log(np.maximum(probs, np.finfo(np.float64).tiny)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def is_temperature(value: Any) -> bool:
    """Whether `value` (e.g. read from a file) can be a temperature: a finite positive number."""
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and bool(np.isfinite(value)) and value > 0
    )


def temperature_metric(temperature: float) -> str:
    return f"{TEMPERATURE_NLL_PREFIX}{temperature:g}"


def nll_by_temperature(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The NLL of `probs` tempered by each of TEMPERATURES, keyed `nll-t<T>`: what a client
    reports on its held-out split so that the server can fit the run's temperature."""
    return {temperature_metric(t): nll(tempered(probs, t), labels) for t in TEMPERATURES}


def fitted_temperature(metrics: Mapping[str, Any]) -> float | None:
    """The temperature of TEMPERATURES with the lowest NLL in `metrics` (the clients' example-
    weighted `nll-t<T>`); None unless every temperature has a finite NLL there."""
    scores = [metrics.get(temperature_metric(t)) for t in TEMPERATURES]
    if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in scores):
        return None
    return TEMPERATURES[int(np.argmin(scores))]


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    x: np.ndarray,
    device: torch.device,
    batch_size: int = 1024,
    temperature: float = 1.0,
) -> np.ndarray:
    """softmax(logits / temperature) of `model` on `x`, in float64."""
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        batch = torch.from_numpy(x[start : start + batch_size]).to(device)
        out.append(torch.softmax(model(batch).double() / temperature, dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))
