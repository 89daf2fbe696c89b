"""Server-side evaluation of the global model on the held-out test set."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from task.data import ArrayData
from task.metrics import classification_metrics, predict_probs
from task.params import load_record, numpy_to_record, record_to_numpy


def evaluate_mean(
    model: nn.Module, arrays: ArrayRecord, test: ArrayData, device: torch.device
) -> dict[str, float]:
    """Accuracy, NLL and ECE of the network at the global weights (the posterior mean)."""
    load_record(model, arrays)
    return classification_metrics(predict_probs(model.to(device), test.x, device), test.y)


def bma_probs(
    model: nn.Module,
    mean: dict[str, np.ndarray],
    precision: dict[str, np.ndarray],
    x: np.ndarray,
    device: torch.device,
    samples: int,
    seed: int,
) -> np.ndarray:
    """Bayesian model averaging: the mean softmax over `samples` draws theta ~ N(m, diag(S)^-1)."""
    rng = np.random.default_rng(seed)
    total = None
    for _ in range(samples):
        draw = {
            k: (m + rng.standard_normal(m.shape) / np.sqrt(precision[k])).astype(m.dtype)
            for k, m in mean.items()
        }
        load_record(model, numpy_to_record(draw))
        probs = predict_probs(model.to(device), x, device)
        total = probs if total is None else total + probs
    return total / samples


def evaluate_bma(
    model: nn.Module,
    posterior: tuple[ArrayRecord, ArrayRecord],
    test: ArrayData,
    device: torch.device,
    samples: int,
    seed: int,
) -> dict[str, float]:
    mean, precision = (record_to_numpy(r) for r in posterior)
    probs = bma_probs(model, mean, precision, test.x, device, samples, seed)
    return {f"bma_{k}": v for k, v in classification_metrics(probs, test.y).items()}
