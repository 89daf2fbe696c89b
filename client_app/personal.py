"""Personal models on a node (`personalize`): made, kept on disk, scored on the node's test split.

- `posterior` (BayesADMM, diagonal): after each training round the node interpolates, in
  natural parameters, the global Gaussian it trained against and the local posterior it just
  fitted (`task.personal.interpolate_gaussians`); no extra training. `personal-weight = auto`:
  the node holds out `personal-val-fraction` of its training split (never trained on) and picks
  lambda from `AUTO_WEIGHTS` there, by accuracy, then NLL.
- `ditto`: after each training round the node trains its personal weights v (kept across
  rounds, the global at first) for `personal-epochs` with SGD on its loss plus
  (ditto-lambda / 2) ||v - w_g||^2, w_g the global it received (Li et al., 2021).
- `finetune`: at each personal evaluation the node trains the global it is sent for
  `personal-epochs` with SGD (FedAvg+FT).

The personal model is filed like the node's other lasting state (`PersonalState`: atomic, same
folder and path rules, its own lock) as `personal-<state key>-<identity>.npz` holding
`mean/<key>` (and `precision/<key>` for `posterior`) in the layout of a run's posterior.npz, so
`bayesfl predict --personal` reads it. The end of the run does not delete it: it is the
product, not bookkeeping.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict

from client_app.local import ClientRound, node_data
from client_app.optimizers import build_optimizer
from client_app.state import ClientState
from client_app.training import train_epochs
from task import records
from task.config import RunConfig
from task.data import ArrayData, split_train_val
from task.metrics import classification_metrics, predict_probs
from task.params import flatten, load_arrays, record_to_numpy, unflatten
from task.personal import PERSONAL_PREFIX, AUTO_WEIGHTS, interpolate_gaussians, interpolation_weight
from task.predict import bma_probs

LAMBDA_KEY = "lambda"
# Seeds of the node's own draws, apart from its training seed: the validation split for
# `personal-weight = auto`, the personal model's training and its BMA draws.
VAL_SEED_OFFSET, TRAIN_SEED_OFFSET, BMA_SEED_OFFSET = 7919, 104_729, 1_299_709


class PersonalState(ClientState):
    """The node's personal model, beside (not inside) its method's state."""

    FILE_PREFIX = PERSONAL_PREFIX
    ARRAYS_RECORD, META_RECORD = "personal-model", "personal-model-meta"


def personal_state(msg: Message, context: Context) -> PersonalState:
    config = msg.content.config_records.get(records.CONFIG) or {}
    return PersonalState(
        context, config.get(records.STATE_KEY), config.get(records.CLIENT_STATE_DIR)
    )


def lambda_split(cfg: RunConfig, train: ArrayData) -> tuple[ArrayData, ArrayData]:
    """(what the node trains on, where it picks lambda): the whole training split and nothing,
    unless `personal-weight = auto`."""
    if not cfg.personal_lambda_is_auto:
        return train, ArrayData(train.x[:0], train.y[:0])
    fit, held_out = split_train_val(train, cfg.personal_val_fraction, cfg.seed + VAL_SEED_OFFSET)
    return fit, held_out


def evaluates(cfg: RunConfig, server_round: int) -> bool:
    """Whether this round's evaluation scores the personal models too."""
    if cfg.personalize == "none":
        return False
    return server_round % cfg.personal_eval_every == 0 or server_round == cfg.num_server_rounds


# ----------------------------------------------------------------------------- training side


def after_train(round_: ClientRound, reply: RecordDict, msg: Message, context: Context) -> None:
    """Update the personal model after the method's training step (`posterior`, `ditto`)."""
    if round_.cfg.personalize == "posterior":
        arrays = _interpolated(round_, reply, context)
    elif round_.cfg.personalize == "ditto":
        arrays = None  # read under the lock below
    else:
        return
    with personal_state(msg, context) as state:
        if arrays is None:
            arrays = _ditto_step(round_, state.load())
        state.save(arrays, round_.server_round)


def _interpolated(round_: ClientRound, reply: RecordDict, context: Context) -> dict[str, np.ndarray]:
    like = round_.received[records.ARRAYS]
    global_mean = flatten(like).astype(np.float64)
    if bool(round_.config[records.AT_PRIOR]):
        global_mean = np.zeros_like(global_mean)  # the prior N(0, 1/delta), as the client saw it
    global_precision = flatten(round_.received[records.PRECISION]).astype(np.float64)
    local_mean = flatten(record_to_numpy(reply[records.ARRAYS])).astype(np.float64)
    local_precision = flatten(record_to_numpy(reply[records.PRECISION])).astype(np.float64)
    cfg = round_.cfg
    if cfg.personal_lambda_is_auto:
        full_train, _, _ = node_data(cfg, tuple(sorted(context.node_config.items())))
        _, held_out = lambda_split(cfg, full_train)
        lam = _best_lambda(round_, held_out, global_mean, global_precision, local_mean, local_precision)
    else:
        lam = float(cfg.personal_weight)
    mean, precision = interpolate_gaussians(
        global_mean, global_precision, local_mean, local_precision, lam
    )
    return _layout(mean, like, precision) | {LAMBDA_KEY: np.float64(lam)}


def _best_lambda(round_: ClientRound, held_out: ArrayData, *gaussians: np.ndarray) -> float:
    """The lambda of `AUTO_WEIGHTS` with the best held-out accuracy, then NLL (the local
    posterior when nothing is held out)."""
    if not len(held_out):
        return math.inf
    like = round_.received[records.ARRAYS]
    scores = []
    for lam in AUTO_WEIGHTS:
        mean, _ = interpolate_gaussians(*gaussians, lam)
        metrics = _score(round_, unflatten(mean, like), held_out)
        scores.append((-metrics["accuracy"], metrics["nll"], lam))
    return min(scores)[2]


def _ditto_step(round_: ClientRound, saved: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ditto's personal update: `personal-epochs` of SGD on l_k(v) + (mu/2)||v - w_g||^2."""
    cfg, like = round_.cfg, round_.received[records.ARRAYS]
    model = round_.model_at()  # holds w_g
    params = list(model.parameters())
    anchor = torch.cat([p.detach().reshape(-1).clone() for p in params])
    if saved:
        load_arrays(model, _weights(saved))

    def proximal() -> torch.Tensor:
        x = torch.cat([p.reshape(-1) for p in params])
        return 0.5 * cfg.ditto_lambda * (x - anchor).square().sum()

    optimizer = build_optimizer(cfg, params, cfg.local_lr, len(round_.train))
    train_epochs(
        model, round_.train, optimizer, cfg.personal_epochs, cfg.batch_size, round_.device,
        round_.seed + TRAIN_SEED_OFFSET, penalty=proximal,
    )
    return _layout(flatten(model.state_dict()).cpu().numpy(), like)


# ----------------------------------------------------------------------------- evaluation side


def evaluate(round_: ClientRound, test: ArrayData, msg: Message, context: Context) -> dict:
    """Metrics of the node's personal model on its test split, `personal-` prefixed; a node
    without one yet (never trained in this run) scores the global (`personal-trained` 0)."""
    cfg = round_.cfg
    with personal_state(msg, context) as state:
        if cfg.personalize == "finetune":
            saved = _finetuned(round_)
            state.save(saved, round_.server_round)
        else:
            saved = state.load()
    trained = bool(saved)
    weights = _weights(saved) if trained else round_.received[records.ARRAYS]
    out = _score(round_, weights, test)
    if cfg.personalize == "posterior":
        precision = _weights(saved, "precision/") if trained else None
        if precision is not None:
            seed = round_.seed + BMA_SEED_OFFSET
            probs, _, _ = bma_probs(
                round_.model_at(), weights, precision, test.x, round_.device,
                cfg.eval_mc_samples, seed,
            )
            out |= {f"bma-{k}": v for k, v in classification_metrics(probs, test.y).items()}
        else:
            out |= {f"bma-{k}": v for k, v in out.items()}
        # w, not lambda: the local posterior's lambda is infinite, and metrics must be finite
        out["w"] = interpolation_weight(float(saved[LAMBDA_KEY])) if trained else 0.0
    out["trained"] = int(trained)
    return {f"personal-{k}": v for k, v in out.items()}


def _finetuned(round_: ClientRound) -> dict[str, np.ndarray]:
    cfg = round_.cfg
    model = round_.model_at()
    optimizer = build_optimizer(cfg, model.parameters(), cfg.local_lr, len(round_.train))
    train_epochs(
        model, round_.train, optimizer, cfg.personal_epochs, cfg.batch_size, round_.device,
        round_.seed + TRAIN_SEED_OFFSET,
    )
    return _layout(flatten(model.state_dict()).cpu().numpy(), round_.received[records.ARRAYS])


def _score(round_: ClientRound, weights: dict[str, np.ndarray], data: ArrayData) -> dict:
    model = round_.model_at()
    load_arrays(model, weights)
    return classification_metrics(predict_probs(model, data.x, round_.device), data.y)


def _layout(
    mean: np.ndarray, like: dict[str, np.ndarray], precision: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Flat vectors as posterior.npz lays them out: `mean/<key>` (and `precision/<key>`)."""
    out = {f"mean/{k}": v for k, v in unflatten(mean, like).items()}
    if precision is not None:
        out |= {f"precision/{k}": v for k, v in unflatten(precision, like).items()}
    return out


def _weights(saved: dict[str, np.ndarray], group: str = "mean/") -> dict[str, np.ndarray] | None:
    found = {k.removeprefix(group): v for k, v in saved.items() if k.startswith(group)}
    return found or None
