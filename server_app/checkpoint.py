"""Checkpoints: after every round, everything the server needs to go on from that round.

One `.npz` written atomically: the global model (`global/<key>`), the strategy's state
(`strategy/<name>` arrays plus JSON metadata, e.g. BayesADMM's global posterior and dual sums,
FedPA's server momentum, the node-sampling RNG), the round, and the key under which clients keep
their lasting state and the folder simulated nodes keep it in, so that a resumed run finds the
clients' BayesADMM duals again, and whether the run finished (its nodes then deleted that state).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from task.records import CLIENT_STATE_FOLDER
from task.config import ConfigError, RunConfig
from task.files import save_npz
from task.metrics import is_temperature

CHECKPOINT = "checkpoint.npz"
# Keys a resumed run may change; any other difference is a different experiment.
RESUMABLE_CHANGES = {
    "num-server-rounds", "output-dir", "resume-from", "round-timeout", "fraction-evaluate", "overwrite",
}


@dataclass(frozen=True)
class Checkpoint:
    round: int
    state_key: str
    config: dict[str, Any]
    global_arrays: dict[str, np.ndarray]
    strategy_arrays: dict[str, np.ndarray]
    strategy_meta: dict[str, Any]
    client_state_dir: str = ""  # <output-dir>/client-state of the run's first folder
    finished: bool = False  # the nodes were told the run is over and deleted their state
    run_id: str = ""  # empty: a checkpoint from before run ids, whose run is named by its state key
    temperature: float = 1.0  # the run's fitted predictive temperature (server_app/evaluation.py)


# The metadata a checkpoint must hold, the JSON type of each, and its name in a message.
META_TYPES: dict[str, tuple[type, str]] = {
    "round": (int, "an integer"), "state_key": (str, "a string"),
    "config": (dict, "an object"), "strategy": (dict, "an object"),
}


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    meta = {
        "round": checkpoint.round,
        "state_key": checkpoint.state_key,
        "run_id": checkpoint.run_id,
        "config": checkpoint.config,
        "strategy": checkpoint.strategy_meta,
        "client_state_dir": checkpoint.client_state_dir,
        "finished": checkpoint.finished,
        "temperature": checkpoint.temperature,
    }
    arrays = {f"global/{k}": v for k, v in checkpoint.global_arrays.items()}
    arrays |= {f"strategy/{k}": v for k, v in checkpoint.strategy_arrays.items()}
    arrays["__meta__"] = np.array(json.dumps(meta))
    arrays["__run_id__"] = np.array(checkpoint.run_id)
    save_npz(folder / CHECKPOINT, arrays)


def load_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint in `folder` (or at that path); ConfigError with one line if it is not one."""
    path = folder / CHECKPOINT if folder.is_dir() else folder
    if not path.exists():
        raise ConfigError(f"resume-from: no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["__meta__"]))
            global_arrays = {k[7:]: npz[k] for k in npz.files if k.startswith("global/")}
            strategy = {k[9:]: npz[k] for k in npz.files if k.startswith("strategy/")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise ConfigError(
            f"resume-from: {path} is not a readable checkpoint ({_one_line(err)})"
        ) from None
    if not isinstance(meta, dict):
        raise ConfigError(f"resume-from: {path}: its metadata is a {type(meta).__name__}, not an object")
    for key, (kind, name) in META_TYPES.items():
        if key not in meta:
            raise ConfigError(f"resume-from: {path}: its metadata lacks '{key}'")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise ConfigError(f"resume-from: {path}: metadata '{key}' = {meta[key]!r} is not {name}")
    if meta["round"] < 0:
        raise ConfigError(f"resume-from: {path}: round = {meta['round']} is negative")
    if not meta["state_key"]:
        raise ConfigError(f"resume-from: {path}: its state_key is empty")
    run_id = meta.get("run_id", "")
    if not isinstance(run_id, str):
        raise ConfigError(f"resume-from: {path}: metadata 'run_id' = {run_id!r} is not a string")
    temperature = meta.get("temperature", 1.0)
    if not is_temperature(temperature):
        raise ConfigError(f"resume-from: {path}: metadata 'temperature' = {temperature!r} is not a positive number")
    return Checkpoint(
        meta["round"], meta["state_key"], meta["config"], global_arrays, strategy, meta["strategy"],
        # Checkpoints written before these fields: the state folder sits beside the checkpoint.
        client_state_dir=meta.get("client_state_dir") or str(path.resolve().parent / CLIENT_STATE_FOLDER),
        finished=meta.get("finished", False),
        run_id=run_id or meta["state_key"],
        temperature=float(temperature),
    )


def check_compatible(
    checkpoint: Checkpoint,
    cfg: RunConfig,
    global_like: Mapping[str, np.ndarray],
    strategy_like: Mapping[str, np.ndarray],
) -> None:
    """A resumed run must be the same experiment: only RESUMABLE_CHANGES may differ, and the
    checkpoint's arrays must fit the model (`global_like`) and the strategy (`strategy_like`,
    its state before any round: arrays it has then must be in the checkpoint, the same dtype
    and rank, and the same shape unless empty then, as a list of nodes is)."""
    now, known = cfg.to_dict(), RunConfig.model_fields
    aliases = {info.alias or name for name, info in known.items()}
    defaults = RunConfig().to_dict()
    for key, value in checkpoint.config.items():
        if key not in aliases:
            raise ConfigError(f"resume-from: the checkpoint's config has key '{key}' this version does not know")
        if key not in RESUMABLE_CHANGES and now.get(key) != value:
            raise ConfigError(
                f"resume-from: '{key}' = {now.get(key)!r} but the checkpoint was made with {value!r}"
            )
    if checkpoint.finished and cfg.strategy == "bayes-admm":
        raise ConfigError(
            f"resume-from: the run finished at round {checkpoint.round} and its nodes deleted "
            "their BayesADMM duals; it cannot be extended, start a new run"
        )
    for key, value in now.items():  # keys newer than the checkpoint: it was made with their default
        if key not in checkpoint.config and key not in RESUMABLE_CHANGES and value != defaults[key]:
            raise ConfigError(
                f"resume-from: '{key}' = {value!r} but the checkpoint predates the key "
                f"(made with its default {defaults[key]!r})"
            )
    if checkpoint.round >= cfg.num_server_rounds:
        raise ConfigError(
            f"resume-from: the checkpoint is at round {checkpoint.round}, "
            f"num-server-rounds is {cfg.num_server_rounds}: nothing left to run"
        )
    _check_arrays("global", checkpoint.global_arrays, global_like, exact_keys=True)
    _check_arrays("strategy", checkpoint.strategy_arrays, strategy_like, exact_keys=False)


def _check_arrays(
    group: str, arrays: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray], exact_keys: bool
) -> None:
    missing = sorted(set(like) - set(arrays))
    extra = sorted(set(arrays) - set(like)) if exact_keys else []
    if missing or extra:
        raise ConfigError(
            f"resume-from: the checkpoint's {group} arrays do not fit this run "
            f"(missing {missing}, unexpected {extra})"
        )
    for key, ref in like.items():
        array = arrays[key]
        shape_differs = array.shape != ref.shape and (ref.size > 0 or array.ndim != ref.ndim)
        # Text arrays (client ids) are as wide as their longest entry.
        dtype_differs = array.dtype != ref.dtype and not (array.dtype.kind == ref.dtype.kind == "U")
        if dtype_differs or shape_differs:
            raise ConfigError(
                f"resume-from: checkpoint array '{group}/{key}' is {array.dtype} {array.shape}, "
                f"this run needs {ref.dtype} {ref.shape}"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ConfigError(f"resume-from: checkpoint array '{group}/{key}' has non-finite values")


def _one_line(err: Exception) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())
