"""Server-side evaluation of the global model on the held-out test set."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord
from torch import nn

from task.data import ArrayData
from task.metrics import classification_metrics, predict_probs
from task.params import load_record


def evaluate_mean(
    model: nn.Module, arrays: ArrayRecord, test: ArrayData, device: torch.device
) -> dict[str, float]:
    """Accuracy, NLL and ECE of the network at the global weights (the posterior mean)."""
    load_record(model, arrays)
    return classification_metrics(predict_probs(model.to(device), test.x, device), test.y)
