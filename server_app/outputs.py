"""What every run leaves behind: results.json, metrics.png and the final global model, and
the global model's uncertainty (uncertainty.png, reliability.png; server_app/uncertainty.py).

The model is self-contained: model.json beside model.npz (and posterior.npz) records what
prediction needs without the data set: input shape, classes, the network and the preprocessing
that turned raw inputs into training inputs. results.json says `"status": "running"` until
every artifact is written, then `"completed"`: a file left by a failed run never says so.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from server_app.checkpoint import CHECKPOINT
from server_app.figures import new_figure, save_figure
from server_app.uncertainty import UncertaintyReport, plot_reliability, plot_uncertainty
from server_app.personal import PERSONAL_PLOT
from task.config import ConfigError, RunConfig
from task.data import PREPROCESSING, ArrayData, DataSpec, class_names
from task.files import save_npz, write_atomic
from task.params import record_to_numpy
from task.predict import RUN_ID_KEY, TEMPERATURE, TEST_ENTROPY

RESULTS, PLOT, MODEL, POSTERIOR = "results.json", "metrics.png", "model.npz", "posterior.npz"
MODEL_CARD = "model.json"
UNCERTAINTY_PLOT, RELIABILITY_PLOT = "uncertainty.png", "reliability.png"
# What a run leaves in its folder; `overwrite` deletes an earlier run's before anything is written.
ARTIFACTS = (
    RESULTS, PLOT, MODEL, POSTERIOR, MODEL_CARD, CHECKPOINT, UNCERTAINTY_PLOT, RELIABILITY_PLOT,
    PERSONAL_PLOT,
)
# What a launcher writes into the folder before the ServerApp starts (`bayesfl run`'s run config).
LAUNCHER_FILES = ("run-config.toml",)
RUNNING, COMPLETED = "running", "completed"
MODEL_CARD_FORMAT = 1
# The run-config keys that decide the network's shape (the weights come from model.npz).
ARCHITECTURE_KEYS = ("model", "mlp-hidden", "activation")


def resolve_output_dir(cfg: RunConfig) -> Path:
    """The run's folder, created; ConfigError if it holds files that are not this run's."""
    if cfg.resume_from and not cfg.output_dir:  # a resumed run continues in its own folder
        path = Path(cfg.resume_from)
        path = path.parent if path.is_file() else path
    elif cfg.output_dir:
        path = Path(cfg.output_dir).expanduser()
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        path = Path("outputs") / f"{stamp}-{cfg.strategy}"
    path = path.resolve()
    check_output_dir(path, cfg)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_output_dir(path: Path, cfg: RunConfig) -> None:
    """Refuse a folder that holds files, unless the run resumes from it or may overwrite it;
    with `overwrite`, delete an earlier run's artifacts first so none can outlive it and be
    taken for this run's (a stale posterior.npz beside a new model.json)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output-dir: {path} is a file, not a folder")
    if not path.is_dir() or path == resume_folder(cfg):
        return
    held = sorted(p.name for p in path.iterdir() if p.name not in LAUNCHER_FILES)
    if not held:
        return
    if not cfg.overwrite:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise ConfigError(
            f"output-dir: {path} already holds {len(held)} file(s) ({shown}); use an empty or new "
            "folder, resume-from it, or set overwrite = true"
        )
    for name in ARTIFACTS:
        (path / name).unlink(missing_ok=True)


def resume_folder(cfg: RunConfig) -> Path | None:
    if not cfg.resume_from:
        return None
    path = Path(cfg.resume_from).expanduser().resolve()
    return path.parent if path.is_file() else path


class RunOutputs:
    def __init__(self, cfg: RunConfig, run_id: str) -> None:
        self.dir = resolve_output_dir(cfg)
        self.cfg = cfg
        self.run_id = run_id
        self.results: dict[str, Any] = {
            "run_id": run_id, "config": cfg.to_dict(), "status": RUNNING, "rounds": [],
        }

    def continue_from(self, folder: Path, last_round: int) -> None:
        """Carry over the rounds up to the checkpoint from the run being resumed."""
        folder = folder.parent if folder.is_file() else folder
        previous = folder / RESULTS
        rounds = json.loads(previous.read_text())["rounds"] if previous.exists() else []
        self.results["rounds"] = [r for r in rounds if r["round"] <= last_round]
        self.results["resumed_at_round"] = self.results.get("resumed_at_round", []) + [last_round]

    def add_round(self, entry: dict[str, Any]) -> None:
        self.results["rounds"].append(strict_json_entry(entry))
        self.write_results()

    def write_results(self) -> None:
        write_atomic(self.dir / RESULTS, json.dumps(self.results, indent=2, allow_nan=False).encode())

    def save_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> Path:
        save_npz(self.dir / name, {**arrays, RUN_ID_KEY: np.array(self.run_id)})
        return self.dir / name

    def save_model(
        self,
        arrays: dict[str, np.ndarray],
        spec: DataSpec,
        test: ArrayData,
        uncertainty: UncertaintyReport | None = None,
        temperature: float = 1.0,
    ) -> Path:
        """The final global model (model.npz) and what predicting with it needs (model.json):
        with the last uncertainty evaluation, the test set's entropy quantiles of the predictive
        `bayesfl predict` uses, for `--coverage`."""
        card = {**model_card(self.cfg, spec, test), "run-id": self.run_id, TEMPERATURE: temperature}
        if uncertainty is not None and uncertainty.test_entropy_quantiles is not None:
            card[TEST_ENTROPY] = {
                "predictive": uncertainty.predictive,
                "quantiles": uncertainty.test_entropy_quantiles,
            }
        self.save_arrays(MODEL, arrays)
        write_atomic(self.dir / MODEL_CARD, json.dumps(card, indent=2).encode())
        return self.dir / MODEL

    def mark_completed(self) -> None:
        """The last write of a run: every artifact is in place."""
        self.results["status"] = COMPLETED
        self.write_results()

    def plot(self) -> Path:
        rounds, strategy = self.results["rounds"], self.results["config"]["strategy"]
        plot_rounds(rounds, self.dir / PLOT, strategy)
        plot_uncertainty(rounds, self.dir / UNCERTAINTY_PLOT, strategy)
        plot_reliability(rounds, self.dir / RELIABILITY_PLOT, strategy)
        return self.dir / PLOT


def strict_json_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """`entry` with every non-finite float written as null, and why under `not_finite`.

    JSON has no NaN or Infinity (Python's json module writes them, most readers refuse them).
    """
    reasons: dict[str, str] = {}

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            reasons[path] = f"{value} is not a finite number, written as null"
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = clean(entry, "")
    if reasons:
        cleaned["not_finite"] = reasons
    return cleaned


def model_card(cfg: RunConfig, spec: DataSpec, test: ArrayData) -> dict[str, Any]:
    config = cfg.to_dict()
    return {
        "format": MODEL_CARD_FORMAT,
        "strategy": cfg.strategy,
        "dataset": cfg.dataset,
        "input-shape": list(spec.input_shape),
        "num-classes": spec.num_classes,
        "class-names": class_names(cfg),
        "architecture": {key: config[key] for key in ARCHITECTURE_KEYS},
        # input-range: what the server's test inputs spanned after preprocessing; inputs far
        # outside it were scaled some other way (e.g. digits' raw 0..16 pixels).
        "preprocessing": {
            **PREPROCESSING,
            "input-range": [float(test.x.min()), float(test.x.max())] if len(test) else None,
        },
    }


def posterior_arrays(mean: ArrayRecord, precision: ArrayRecord) -> dict[str, np.ndarray]:
    """The global Gaussian N(mean, diag(precision)^-1) as arrays `mean/<key>`, `precision/<key>`."""
    arrays = {f"mean/{k}": v for k, v in record_to_numpy(mean).items()}
    return arrays | {f"precision/{k}": v for k, v in record_to_numpy(precision).items()}


def plot_rounds(rounds: list[dict[str, Any]], path: Path, title: str) -> None:
    fig, axes = new_figure(2, (10, 4))
    from matplotlib.ticker import MaxNLocator

    x = [r["round"] for r in rounds]
    for ax, metric in zip(axes, ("accuracy", "nll")):
        ax.plot(x, [r[metric] for r in rounds], marker="o", label="mean prediction")
        if rounds and f"bma_{metric}" in rounds[-1]:
            ax.plot(x, [r.get(f"bma_{metric}") for r in rounds], marker="s", label="BMA")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path, f"{title}: server test set")
