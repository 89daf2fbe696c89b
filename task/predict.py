"""Predict with a finished run's global model: class probabilities and their uncertainty.

A run folder is self-contained: `model.json` records the input shape, the classes, the network
and the preprocessing used in training, so prediction needs neither the data set nor the run's
config. A BayesADMM run also leaves `posterior.npz` (the global Gaussian N(m_g, diag(S_g)^-1));
predictions then average the softmax over Monte Carlo draws of the weights (Bayesian model
averaging) and report the spread across draws. Other runs predict with `model.npz`, a point
estimate.

    bayesfl predict RUN_DIR INPUTS.npz [--samples 32] [--out predictions.npz]

INPUTS.npz holds an array `x` of raw inputs as the data set stores them (uint8 pixels are
scaled as in training) or already-scaled float inputs, shaped like one example or flattened; a
`y` array, if present, is used to print accuracy, NLL and ECE.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from task.config import ConfigError, RunConfig, parse_run_config
from task.data import DataSpec, model_inputs
from task.metrics import classification_metrics, predict_probs
from task.models import build_model, resolve_device
from task.params import load_record, numpy_to_record

MODEL_CARD, MODEL, POSTERIOR = "model.json", "model.npz", "posterior.npz"
KNOWN_FORMAT = 1


@dataclass(frozen=True)
class GlobalModel:
    cfg: RunConfig  # the network's settings (model, mlp-hidden, activation)
    spec: DataSpec
    mean: dict[str, np.ndarray]
    precision: dict[str, np.ndarray] | None  # None for a point estimate
    class_names: list[str] | None
    preprocessing: dict[str, Any]


@dataclass(frozen=True)
class Prediction:
    probs: np.ndarray  # (N, classes): the predictive distribution
    probs_std: np.ndarray  # (N, classes): spread of the probabilities across weight draws
    entropy: np.ndarray  # (N,): entropy of the predictive distribution, in nats


def load_global_model(run_dir: str | Path) -> GlobalModel:
    """The final model of the run in `run_dir`, from its files alone."""
    run_dir = Path(run_dir)
    card_path = run_dir / MODEL_CARD
    if not card_path.exists():
        raise ConfigError(
            f"{run_dir} is not a finished run folder (no {MODEL_CARD}; runs record it at the end)"
        )
    try:
        card = json.loads(card_path.read_text())
        if card.get("format") != KNOWN_FORMAT:
            raise ConfigError(f"{card_path} has format {card.get('format')!r}, not {KNOWN_FORMAT}")
        cfg = parse_run_config(card["architecture"])
        spec = DataSpec(tuple(card["input-shape"]), int(card["num-classes"]))
        preprocessing, names = card["preprocessing"], card["class-names"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{card_path} is not a readable model card: {err!r}") from None
    posterior = run_dir / POSTERIOR
    if posterior.exists():
        with np.load(posterior) as npz:
            mean = {k.removeprefix("mean/"): npz[k] for k in npz.files if k.startswith("mean/")}
            precision = {
                k.removeprefix("precision/"): npz[k] for k in npz.files if k.startswith("precision/")
            }
        return GlobalModel(cfg, spec, mean, precision, names, preprocessing)
    with np.load(run_dir / MODEL) as npz:
        mean = {k: npz[k] for k in npz.files}
    return GlobalModel(cfg, spec, mean, None, names, preprocessing)


def prepare(model: GlobalModel, x: np.ndarray) -> np.ndarray:
    """Raw inputs as the model was trained on them: the recorded preprocessing, then its shape."""
    x = model_inputs(np.asarray(x), model.preprocessing["uint8-divisor"])
    size = int(np.prod(model.spec.input_shape))
    if x.ndim == 0 or int(np.prod(x.shape[1:])) != size:
        raise ConfigError(
            f"inputs of shape {tuple(x.shape)} do not fit the model's input shape "
            f"{model.spec.input_shape} (N x {size} values)"
        )
    return np.ascontiguousarray(x.reshape((-1,) + model.spec.input_shape))


def range_warning(model: GlobalModel, raw: np.ndarray) -> str | None:
    """A line when the prepared inputs reach well outside what training inputs spanned."""
    span, x = model.preprocessing.get("input-range"), prepare(model, raw)
    if span is None or not len(x):
        return None
    low, high = span
    margin = 0.5 * max(high - low, 1e-12)
    if x.min() < low - margin or x.max() > high + margin:
        return (
            f"warning: inputs span {x.min():.4g}..{x.max():.4g} but training inputs spanned "
            f"{low:.4g}..{high:.4g}: scale them as in training (model.json, preprocessing)"
        )
    return None


def predict(
    model: GlobalModel, x: np.ndarray, samples: int = 32, seed: int = 0, device: str = "auto"
) -> Prediction:
    if samples < 1:
        raise ConfigError(f"samples must be at least 1, got {samples}")
    x = prepare(model, x)
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


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="output folder of a finished run")
    parser.add_argument("inputs", help=".npz with array x (and optionally y)")
    parser.add_argument("--samples", type=int, default=32, help="weight draws for BMA (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write probs, probs_std, entropy, predicted to this .npz")
    args = parser.parse_args(argv)
    if args.samples < 1:
        print(f"error: --samples must be at least 1, got {args.samples}", file=sys.stderr)
        return 2
    try:
        model = load_global_model(args.run_dir)
        with np.load(args.inputs) as npz:
            if "x" not in npz.files:
                raise ConfigError(f"{args.inputs} has no array 'x'")
            x, y = npz["x"], npz["y"] if "y" in npz.files else None
        if (warning := range_warning(model, x)) is not None:
            print(warning, file=sys.stderr)
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
        predicted = result.probs.argmax(1)
        extra = {} if model.class_names is None else {
            "predicted_name": np.asarray(model.class_names)[predicted]
        }
        np.savez(
            args.out, probs=result.probs, probs_std=result.probs_std, entropy=result.entropy,
            predicted=predicted, **extra,
        )
        print(f"predictions: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
