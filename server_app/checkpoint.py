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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from task.records import CLIENT_STATE_FOLDER
from task.config import ConfigError, RunConfig
from task.files import save_npz

CHECKPOINT = "checkpoint.npz"
# Keys a resumed run may change; any other difference is a different experiment.
RESUMABLE_CHANGES = {"num-server-rounds", "output-dir", "resume-from", "round-timeout", "fraction-evaluate"}


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


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    meta = {
        "round": checkpoint.round,
        "state_key": checkpoint.state_key,
        "config": checkpoint.config,
        "strategy": checkpoint.strategy_meta,
        "client_state_dir": checkpoint.client_state_dir,
        "finished": checkpoint.finished,
    }
    arrays = {f"global/{k}": v for k, v in checkpoint.global_arrays.items()}
    arrays |= {f"strategy/{k}": v for k, v in checkpoint.strategy_arrays.items()}
    arrays["__meta__"] = np.array(json.dumps(meta))
    save_npz(folder / CHECKPOINT, arrays)


def load_checkpoint(folder: Path) -> Checkpoint:
    path = folder / CHECKPOINT if folder.is_dir() else folder
    if not path.exists():
        raise ConfigError(f"resume-from: no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["__meta__"]))
            global_arrays = {k[7:]: npz[k] for k in npz.files if k.startswith("global/")}
            strategy = {k[9:]: npz[k] for k in npz.files if k.startswith("strategy/")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise ConfigError(f"resume-from: {path} is not a readable checkpoint ({err})") from None
    return Checkpoint(
        meta["round"], meta["state_key"], meta["config"], global_arrays, strategy, meta["strategy"],
        # Checkpoints written before these fields: the state folder sits beside the checkpoint.
        meta.get("client_state_dir") or str(path.resolve().parent / CLIENT_STATE_FOLDER),
        meta.get("finished", False),
    )


def check_compatible(checkpoint: Checkpoint, cfg: RunConfig) -> None:
    """A resumed run must be the same experiment: only RESUMABLE_CHANGES may differ."""
    now = cfg.to_dict()
    for key, value in checkpoint.config.items():
        if key not in RESUMABLE_CHANGES and now.get(key) != value:
            raise ConfigError(
                f"resume-from: '{key}' = {now.get(key)!r} but the checkpoint was made with {value!r}"
            )
    if checkpoint.finished and cfg.strategy == "bayes-admm":
        raise ConfigError(
            f"resume-from: the run finished at round {checkpoint.round} and its nodes deleted "
            "their BayesADMM duals; it cannot be extended, start a new run"
        )
    if checkpoint.round >= cfg.num_server_rounds:
        raise ConfigError(
            f"resume-from: the checkpoint is at round {checkpoint.round}, "
            f"num-server-rounds is {cfg.num_server_rounds}: nothing left to run"
        )
