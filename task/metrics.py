"""Classification metrics on predicted class probabilities: accuracy, NLL, ECE and its
reliability bins, Brier score."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ECE_BINS = 15


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


@torch.no_grad()
def predict_probs(
    model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 1024
) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        batch = torch.from_numpy(x[start : start + batch_size]).to(device)
        out.append(torch.softmax(model(batch).double(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))
