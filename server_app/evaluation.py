"""Server-side evaluation of the global model on the held-out test set."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from torch import nn

from task.data import ArrayData
from task.metrics import classification_metrics, predict_probs
from task.params import load_record, record_to_numpy
from task.predict import bma_probs


def evaluate_mean(
    model: nn.Module, arrays: ArrayRecord, test: ArrayData, device: torch.device
) -> dict[str, float]:
    """Accuracy, NLL and ECE of the network at the global weights (the posterior mean)."""
    load_record(model, arrays)
    return classification_metrics(predict_probs(model.to(device), test.x, device), test.y)


def evaluate_bma(
    model: nn.Module,
    posterior: tuple[ArrayRecord, ArrayRecord],
    test: ArrayData,
    device: torch.device,
    samples: int,
    seed: int,
) -> dict[str, float]:
    """The same metrics for the Bayesian model average over the global posterior."""
    mean, precision = (record_to_numpy(r) for r in posterior)
    probs, _, _ = bma_probs(model, mean, precision, test.x, device, samples, seed)
    return {f"bma_{k}": v for k, v in classification_metrics(probs, test.y).items()}
