"""Predict with a finished run's global model: class probabilities and their uncertainty.

A run folder is self-contained: `model.json` records the input shape, the classes, the network
and the preprocessing used in training, so prediction needs neither the data set nor the run's
config. A BayesADMM run also leaves `posterior.npz` (the global Gaussian N(m_g, diag(S_g)^-1));
predictions then average the softmax over Monte Carlo draws of the weights (Bayesian model
averaging) and report the spread across draws. Other runs predict with `model.npz`, a point
estimate.

    bayesfl predict RUN_DIR INPUTS.npz [--samples 32] [--out predictions.npz]
                    [--abstain-entropy X | --coverage C]
                    [--personal NODE_STATE_FILE_OR_FOLDER]

With `--personal`, the run folder gives the network and preprocessing and a node's personal
model (`personal-<key>-<identity>.npz`, client_app/personal.py: the interpolated Gaussian of
`posterior` personalization, or the weights of `finetune` and `ditto`) gives the weights.

INPUTS.npz holds an array `x` of raw inputs as the data set stores them (uint8 pixels are
scaled as in training) or already-scaled float inputs, shaped like one example or flattened; a
`y` array, if present, is used to print accuracy, NLL and ECE.

Per input it reports the predictive entropy and, for BMA, the mutual information between the
prediction and the weights (task/uncertainty.py). With `--abstain-entropy X` an input whose
entropy exceeds X is flagged `abstain`; `--coverage C` picks X so that a share C of the run's
own test set would have been answered: the run's last uncertainty evaluation stores the test
set's entropy quantiles (of this same predictive) in model.json, so no test data is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from task.config import ConfigError, RunConfig, parse_run_config
from task.data import DataSpec, model_inputs
from task.metrics import classification_metrics, is_temperature, predict_probs
from task.models import build_model, resolve_device
from task.params import load_record, numpy_to_record
from task.uncertainty import entropy_threshold, mutual_information, predictive_entropy
from task.personal import PERSONAL_PREFIX

MODEL_CARD, MODEL, POSTERIOR = "model.json", "model.npz", "posterior.npz"
# Every .npz a run writes names the run (model.json's run-id): prediction refuses to mix runs.
RUN_ID_KEY = "__run_id__"
KNOWN_FORMAT = 1
# model.json: the server test set's predictive entropy at coverages 0, 0.01, ..., 1 (optional)
TEST_ENTROPY = "test-entropy"
TEMPERATURE = "temperature"  # model.json: the temperature dividing every prediction's logits


@dataclass(frozen=True)
class GlobalModel:
    cfg: RunConfig  # the network's settings (model, mlp-hidden, activation)
    spec: DataSpec
    mean: dict[str, np.ndarray]
    precision: dict[str, np.ndarray] | None  # None for a point estimate
    class_names: list[str] | None
    preprocessing: dict[str, Any]
    # the test set's entropy quantiles at coverages 0..1 (TEST_ENTROPY), None if not recorded
    test_entropy_quantiles: list[float] | None = None
    temperature: float = 1.0  # fitted by the run (`predictive-temperature`); 1: raw logits


@dataclass(frozen=True)
class Prediction:
    probs: np.ndarray  # (N, classes): the predictive distribution
    probs_std: np.ndarray  # (N, classes): spread of the probabilities across weight draws
    entropy: np.ndarray  # (N,): entropy of the predictive distribution, in nats
    # (N,): entropy minus the draws' mean entropy (task/uncertainty.py); 0 for a point estimate
    mutual_information: np.ndarray


def load_global_model(run_dir: str | Path) -> GlobalModel:
    """The final model of the run in `run_dir`, from its files alone, checked: keys and shapes
    that fit the recorded network, finite values, positive precisions, and every artifact
    written by one run (the same run id). Any problem is a ConfigError of one line."""
    run_dir = Path(run_dir)
    card_path = run_dir / MODEL_CARD
    if not card_path.exists():
        raise ConfigError(
            f"{run_dir} is not a finished run folder (no {MODEL_CARD}; runs record it at the end)"
        )
    try:
        card = json.loads(card_path.read_text())
        if not isinstance(card, dict):
            raise TypeError(f"a JSON {type(card).__name__}, not an object")
        if card.get("format") != KNOWN_FORMAT:
            raise ConfigError(f"{card_path} has format {card.get('format')!r}, not {KNOWN_FORMAT}")
        # The architecture is checked against the run's own data set (a cnn1d does not fit the
        # default one); cards of data sets named by path or hub id skip that check alike.
        dataset = card.get("dataset")
        cfg = parse_run_config(
            {**card["architecture"], **({"dataset": dataset} if isinstance(dataset, str) else {})}
        )
        shape, classes = card["input-shape"], card["num-classes"]
        if not (isinstance(shape, list) and shape and all(_positive_int(n) for n in shape)):
            raise TypeError(f"input-shape {shape!r} is not a list of positive integers")
        if not _positive_int(classes):
            raise TypeError(f"num-classes {classes!r} is not a positive integer")
        spec = DataSpec(tuple(shape), classes)
        preprocessing, names = card["preprocessing"], card["class-names"]
        if not isinstance(preprocessing, dict) or not isinstance(
            preprocessing.get("uint8-divisor"), (int, float)
        ):
            raise TypeError(f"preprocessing {preprocessing!r} has no numeric uint8-divisor")
        # build_model can fail on a card naming an impossible network (e.g. a cnn on 1-D inputs)
        like = {k: v.shape for k, v in build_model(cfg, spec).state_dict().items()}
        quantiles = _test_entropy_quantiles(card.get(TEST_ENTROPY))
        temperature = card.get(TEMPERATURE, 1.0)  # cards from before temperatures: raw logits
        if not is_temperature(temperature):
            raise TypeError(f"{TEMPERATURE} {temperature!r} is not a positive number")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
            RuntimeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{card_path} is not a readable model card: {_one_line(err)}") from None
    run_id = card.get("run-id")
    posterior = run_dir / POSTERIOR
    if posterior.exists():
        arrays = _load_artifact(posterior, run_id)
        mean = {k.removeprefix("mean/"): v for k, v in arrays.items() if k.startswith("mean/")}
        precision = {
            k.removeprefix("precision/"): v for k, v in arrays.items() if k.startswith("precision/")
        }
        if extra := sorted(k for k in arrays if not k.startswith(("mean/", "precision/"))):
            raise ConfigError(f"{posterior} has arrays {extra} that are neither mean/ nor precision/")
        _check_weights(posterior, "mean", mean, like)
        _check_weights(posterior, "precision", precision, like)
        if (bad := next((k for k, v in precision.items() if not (v > 0).all()), None)) is not None:
            raise ConfigError(f"{posterior}: precision/{bad} has values <= 0 (a precision is positive)")
        if (run_dir / MODEL).exists():
            _load_artifact(run_dir / MODEL, run_id)  # from the same run, or refused
        return GlobalModel(
            cfg, spec, mean, precision, names, preprocessing, quantiles, float(temperature)
        )
    if not (run_dir / MODEL).exists():
        raise ConfigError(f"{run_dir} has {MODEL_CARD} but neither {MODEL} nor {POSTERIOR}")
    mean = _load_artifact(run_dir / MODEL, run_id)
    _check_weights(run_dir / MODEL, "", mean, like)
    return GlobalModel(cfg, spec, mean, None, names, preprocessing, quantiles, float(temperature))


def _test_entropy_quantiles(recorded: Any) -> list[float] | None:
    if recorded is None:
        return None
    quantiles = recorded.get("quantiles") if isinstance(recorded, dict) else None
    if not (
        isinstance(quantiles, list) and len(quantiles) >= 2
        and all(isinstance(q, (int, float)) and not isinstance(q, bool) for q in quantiles)
        and np.all(np.isfinite(quantiles)) and np.all(np.diff(quantiles) >= 0)
    ):
        raise TypeError(f"{TEST_ENTROPY} is not a list of non-decreasing finite quantiles")
    return [float(q) for q in quantiles]


def load_personal_model(run_dir: str | Path, personal: str | Path) -> GlobalModel:
    """The run's network with a node's personal model: `personal` is the node's file, or a
    folder holding exactly one (its state-dir, or a simulated node's partition folder)."""
    model = load_global_model(run_dir)
    path = Path(personal)
    if path.is_dir():
        found = sorted(path.glob(f"{PERSONAL_PREFIX}-*.npz"))
        if len(found) != 1:
            raise ConfigError(
                f"{path} holds {len(found)} personal model files ({PERSONAL_PREFIX}-*.npz), "
                "not one: name the file"
            )
        path = found[0]
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:
        raise ConfigError(f"{path} is not a readable .npz: {_one_line(err)}") from None
    mean = {k.removeprefix("mean/"): v for k, v in arrays.items() if k.startswith("mean/")}
    precision = {
        k.removeprefix("precision/"): v for k, v in arrays.items() if k.startswith("precision/")
    }
    like = {k: v.shape for k, v in build_model(model.cfg, model.spec).state_dict().items()}
    if not mean:
        raise ConfigError(f"{path} holds no personal model (no mean/ arrays)")
    _check_weights(path, "mean", mean, like)
    if precision:
        _check_weights(path, "precision", precision, like)
        if (bad := next((k for k, v in precision.items() if not (v > 0).all()), None)) is not None:
            raise ConfigError(f"{path}: precision/{bad} has values <= 0 (a precision is positive)")
    # The run's temperature was fitted to the global model, not to this node's.
    return replace(model, mean=mean, precision=precision or None, temperature=1.0)


def _load_artifact(path: Path, run_id: str | None) -> dict[str, np.ndarray]:
    """The arrays of a run's .npz, without its run id, which must be `run_id` (model.json's)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:  # zipfile, zlib, numpy's header parser: each has its own errors
        raise ConfigError(f"{path} is not a readable .npz: {_one_line(err)}") from None
    found = arrays.pop(RUN_ID_KEY, None)
    found = None if found is None else str(found)
    if found != run_id:
        raise ConfigError(
            f"{path} is from run {found!r} but {MODEL_CARD} from run {run_id!r}: the folder mixes "
            "two runs' files"
        )
    return arrays


def _check_weights(
    path: Path, group: str, arrays: dict[str, np.ndarray], like: dict[str, tuple[int, ...]]
) -> None:
    name = f"{group}/" if group else ""
    if set(arrays) != set(like):
        raise ConfigError(
            f"{path}: {group or 'weight'} arrays {sorted(arrays)} do not match the network's "
            f"{sorted(like)}"
        )
    for key, shape in like.items():
        array = arrays[key]
        if tuple(array.shape) != tuple(shape) or array.dtype.kind != "f":
            raise ConfigError(
                f"{path}: {name}{key} is {array.dtype} {tuple(array.shape)}, the network needs "
                f"float {tuple(shape)}"
            )
        if not np.isfinite(array).all():
            raise ConfigError(f"{path}: {name}{key} has non-finite values")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


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
        probs = predict_probs(net.to(torch_device), x, torch_device, temperature=model.temperature)
        return Prediction(probs, np.zeros_like(probs), predictive_entropy(probs), np.zeros(len(x)))
    probs, probs_std, expected_entropy = bma_probs(
        net, model.mean, model.precision, x, torch_device, samples, seed, model.temperature
    )
    return Prediction(
        probs, probs_std, predictive_entropy(probs), mutual_information(probs, expected_entropy)
    )


def bma_probs(
    net: torch.nn.Module,
    mean: dict[str, np.ndarray],
    precision: dict[str, np.ndarray],
    x: np.ndarray,
    device: torch.device,
    samples: int,
    seed: int,
    temperature: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bayesian model averaging: the mean softmax(logits / temperature) over `samples` draws
    theta ~ N(m, diag(S)^-1), its standard deviation across draws, and the draws' mean predictive
    entropy per input (accumulated without keeping every draw)."""
    rng = np.random.default_rng(seed)
    average = spread = None
    entropy_sum = 0.0
    for count in range(1, samples + 1):
        weights = {
            k: (m + rng.standard_normal(m.shape) / np.sqrt(precision[k])).astype(m.dtype)
            for k, m in mean.items()
        }
        load_record(net, numpy_to_record(weights))
        probs = predict_probs(net.to(device), x, device, temperature=temperature)
        entropy_sum = entropy_sum + predictive_entropy(probs)
        if average is None:
            average, spread = probs, np.zeros_like(probs)
            continue
        change = probs - average
        average = average + change / count
        spread = spread + change * (probs - average)
    return average, np.sqrt(spread / samples), entropy_sum / samples


def abstain_threshold(
    model: GlobalModel, abstain_entropy: float | None = None, coverage: float | None = None
) -> float | None:
    """The entropy above which prediction abstains: `abstain_entropy` itself, or the one that
    would have answered a share `coverage` of the run's test set (model.json's quantiles)."""
    if abstain_entropy is not None and coverage is not None:
        raise ConfigError("give --abstain-entropy or --coverage, not both")
    if abstain_entropy is not None:
        if not (np.isfinite(abstain_entropy) and abstain_entropy >= 0):
            raise ConfigError(f"--abstain-entropy must be a finite entropy >= 0, got {abstain_entropy}")
        return float(abstain_entropy)
    if coverage is None:
        return None
    if not 0 < coverage <= 1:
        raise ConfigError(f"--coverage must be in (0, 1], got {coverage}")
    if model.test_entropy_quantiles is None:
        raise ConfigError(
            f"--coverage needs the test set's entropy quantiles in {MODEL_CARD} ('{TEST_ENTROPY}'),"
            " which this run did not record: give --abstain-entropy instead"
        )
    return entropy_threshold(np.asarray(model.test_entropy_quantiles), coverage)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="output folder of a finished run")
    parser.add_argument("inputs", help=".npz with array x (and optionally y)")
    parser.add_argument("--samples", type=int, default=32, help="weight draws for BMA (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        help="write probs, probs_std, entropy, mutual_information, predicted, abstain to this .npz",
    )
    abstain = parser.add_mutually_exclusive_group()
    abstain.add_argument("--abstain-entropy", type=float, metavar="X",
                         help="flag inputs whose predictive entropy (nats) exceeds X")
    abstain.add_argument("--coverage", type=float, metavar="C",
                         help="flag inputs above the entropy that answered a share C of the run's "
                         "test set (0 < C <= 1)")
    parser.add_argument(
        "--personal", help="a node's personal model file (or the folder holding it) to use "
        "instead of the global model",
    )
    args = parser.parse_args(argv)
    if args.samples < 1:
        print(f"error: --samples must be at least 1, got {args.samples}", file=sys.stderr)
        return 2
    try:
        if args.personal:
            model = load_personal_model(args.run_dir, args.personal)
        else:
            model = load_global_model(args.run_dir)
        threshold = abstain_threshold(model, args.abstain_entropy, args.coverage)
        with np.load(args.inputs) as npz:
            if "x" not in npz.files:
                raise ConfigError(f"{args.inputs} has no array 'x'")
            x, y = npz["x"], npz["y"] if "y" in npz.files else None
        if (warning := range_warning(model, x)) is not None:
            print(warning, file=sys.stderr)
        result = predict(model, x, args.samples, args.seed)
    except (ConfigError, OSError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except Exception as err:  # anything else a broken file can raise: still one line, no traceback
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    kind = f"BMA over {args.samples} draws" if model.precision is not None else "point estimate"
    line = f"{len(result.probs)} inputs, {kind}; mean predictive entropy {result.entropy.mean():.4f}"
    if model.precision is not None:
        line += f", mean mutual information {result.mutual_information.mean():.4f}"
    print(line)
    abstains = np.zeros(len(result.probs), dtype=bool) if threshold is None else (
        result.entropy > threshold
    )
    if threshold is not None:
        print(f"abstain on {int(abstains.sum())} of {len(abstains)} inputs "
              f"(predictive entropy > {threshold:.4f} nats)")
    if y is not None:
        metrics = classification_metrics(result.probs, y.astype(np.int64))
        print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if threshold is not None and not abstains.all():
            answered = result.probs[~abstains].argmax(1) == y[~abstains]
            print(f"accuracy on the {int((~abstains).sum())} answered inputs {answered.mean():.4f}")
    if args.out:
        predicted = result.probs.argmax(1)
        extra = {} if model.class_names is None else {
            "predicted_name": np.asarray(model.class_names)[predicted]
        }
        np.savez(
            args.out, probs=result.probs, probs_std=result.probs_std, entropy=result.entropy,
            mutual_information=result.mutual_information, predicted=predicted, abstain=abstains,
            **extra,
        )
        print(f"predictions: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
