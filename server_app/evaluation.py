"""Server-side evaluation of the global model on the held-out test set, and the temperature
every prediction of the run is made at."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from task.config import RunConfig
from task.data import ArrayData
from task.metrics import classification_metrics, fitted_temperature, predict_probs
from task.params import load_record, record_to_numpy
from task.predict import bma_probs


def round_temperature(cfg: RunConfig, client_metrics: Mapping[str, Any] | None, previous: float) -> float:
    """The run's temperature after a round: `predictive-temperature` if it is a number; with
    "auto", the one the nodes' held-out NLLs (`client_metrics`, example-weighted) favour, or
    `previous` when no node evaluated this round.

    Fitted on the nodes' data, never on the server's test set, like any other choice a run
    makes. Why: the network at a weight average of label-skewed clients is underconfident before
    consensus, and a Bayesian model average only adds entropy to it (docs/ALGORITHMS.md).
    """
    if cfg.predictive_temperature != "auto":
        return float(cfg.predictive_temperature)
    fitted = fitted_temperature(client_metrics or {})
    return previous if fitted is None else fitted


def evaluate_mean(
    model: nn.Module,
    arrays: ArrayRecord,
    test: ArrayData,
    device: torch.device,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Accuracy, NLL and ECE of the network at the global weights (the posterior mean)."""
    load_record(model, arrays)
    probs = predict_probs(model.to(device), test.x, device, temperature=temperature)
    return classification_metrics(probs, test.y)


def evaluate_bma(
    model: nn.Module,
    posterior: tuple[ArrayRecord, ArrayRecord],
    test: ArrayData,
    device: torch.device,
    samples: int,
    seed: int,
    temperature: float = 1.0,
) -> dict[str, float]:
    """The same metrics for the Bayesian model average over the global posterior."""
    mean, precision = (record_to_numpy(r) for r in posterior)
    probs, _, _ = bma_probs(model, mean, precision, test.x, device, samples, seed, temperature)
    return {f"bma_{k}": v for k, v in classification_metrics(probs, test.y).items()}
