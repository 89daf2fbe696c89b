"""Predict with a finished run's global model: class probabilities and their uncertainty.

A BayesADMM run leaves `posterior.npz` (the global Gaussian N(m_g, diag(S_g)^-1)); predictions
then average the softmax over Monte Carlo draws of the weights (Bayesian model averaging) and
report the spread across draws. Other runs leave `model.npz`, a point estimate.

    python -m task.predict RUN_DIR INPUTS.npz [--samples 32] [--out predictions.npz]

INPUTS.npz holds an array `x` shaped like the training inputs (a `y` array, if present, is used
to print accuracy, NLL and ECE).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from task.config import ConfigError, RunConfig, parse_run_config
from task.data import DataSpec, data_spec
from task.metrics import classification_metrics, predict_probs
from task.models import build_model, resolve_device
from task.params import load_record, numpy_to_record


@dataclass(frozen=True)
class GlobalModel:
    cfg: RunConfig
    spec: DataSpec
    mean: dict[str, np.ndarray]
    precision: dict[str, np.ndarray] | None  # None for a point estimate


@dataclass(frozen=True)
class Prediction:
    probs: np.ndarray  # (N, classes): the predictive distribution
    probs_std: np.ndarray  # (N, classes): spread of the probabilities across weight draws
    entropy: np.ndarray  # (N,): entropy of the predictive distribution, in nats


def load_global_model(run_dir: str | Path) -> GlobalModel:
    run_dir = Path(run_dir)
    results = run_dir / "results.json"
    if not results.exists():
        raise ConfigError(f"{run_dir} is not a run folder (no results.json)")
    cfg = parse_run_config(json.loads(results.read_text())["config"])
    posterior = run_dir / "posterior.npz"
    if posterior.exists():
        with np.load(posterior) as npz:
            mean = {k.removeprefix("mean/"): npz[k] for k in npz.files if k.startswith("mean/")}
            precision = {
                k.removeprefix("precision/"): npz[k] for k in npz.files if k.startswith("precision/")
            }
        return GlobalModel(cfg, data_spec(cfg), mean, precision)
    with np.load(run_dir / "model.npz") as npz:
        mean = {k: npz[k] for k in npz.files}
    return GlobalModel(cfg, data_spec(cfg), mean, None)


def predict(
    model: GlobalModel, x: np.ndarray, samples: int = 32, seed: int = 0, device: str = "auto"
) -> Prediction:
    x = np.asarray(x, dtype=np.float32).reshape((-1,) + model.spec.input_shape)
    torch_device = resolve_device(device)
    net = build_model(model.cfg, model.spec)
    if model.precision is None:
        load_record(net, numpy_to_record(model.mean))
        probs = predict_probs(net.to(torch_device), x, torch_device)
        return Prediction(probs, np.zeros_like(probs), _entropy(probs))
    probs, probs_std = bma_probs(
        net, model.mean, model.precision, x, torch_device, samples, seed
    )
    return Prediction(probs, probs_std, _entropy(probs))


def bma_probs(
    net: torch.nn.Module,
    mean: dict[str, np.ndarray],
    precision: dict[str, np.ndarray],
    x: np.ndarray,
    device: torch.device,
    samples: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Bayesian model averaging: the mean softmax over `samples` draws theta ~ N(m, diag(S)^-1),
    and its standard deviation across draws (accumulated without keeping every draw)."""
    rng = np.random.default_rng(seed)
    average = spread = None
    for count in range(1, samples + 1):
        weights = {
            k: (m + rng.standard_normal(m.shape) / np.sqrt(precision[k])).astype(m.dtype)
            for k, m in mean.items()
        }
        load_record(net, numpy_to_record(weights))
        probs = predict_probs(net.to(device), x, device)
        if average is None:
            average, spread = probs, np.zeros_like(probs)
            continue
        change = probs - average
        average = average + change / count
        spread = spread + change * (probs - average)
    return average, np.sqrt(spread / samples)


def _entropy(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="output folder of a finished run")
    parser.add_argument("inputs", help=".npz with array x (and optionally y)")
    parser.add_argument("--samples", type=int, default=32, help="weight draws for BMA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write probs, probs_std, entropy, predicted to this .npz")
    args = parser.parse_args(argv)
    try:
        model = load_global_model(args.run_dir)
        with np.load(args.inputs) as npz:
            if "x" not in npz.files:
                raise ConfigError(f"{args.inputs} has no array 'x'")
            x, y = npz["x"], npz["y"] if "y" in npz.files else None
        result = predict(model, x, args.samples, args.seed)
    except (ConfigError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kind = f"BMA over {args.samples} draws" if model.precision is not None else "point estimate"
    print(f"{len(result.probs)} inputs, {kind}; mean predictive entropy {result.entropy.mean():.4f}")
    if y is not None:
        metrics = classification_metrics(result.probs, y.astype(np.int64))
        print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.out:
        np.savez(
            args.out, probs=result.probs, probs_std=result.probs_std, entropy=result.entropy,
            predicted=result.probs.argmax(1),
        )
        print(f"predictions: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
