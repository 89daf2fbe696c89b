"""Client half of BayesADMM (IVON-ADMM): local solve, dual update, lasting state.

Diagonal posterior: IVON with the received global as prior and the client's duals
(`task.ivon_admm.IVONADMM`). Isotropic posterior (fixed unit covariance, classic federated
ADMM): the optimizer of the run config on l_k(x) - (tau/N_k) v_k.x + (tau rho/2N_k)||x - m~||^2.

Dual bookkeeping under partial participation: the increment of this round is kept *pending*
and committed at the start of the node's next round only if the server says it accepted this
round's reply (`accepted-round`); a reply that was lost, late or rejected leaves the duals as
they were, so the server's running dual sums always equal the sum of what the clients hold.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict

from client_app.fedpa import flatten_params
from client_app.local import ClientRound
from client_app.optimizers import build_optimizer
from client_app.training import train_epochs
from strategies import records
from strategies.bayes_admm import client_dual_increment, cosine_lr
from task.ivon_admm import IVONADMM
from task.params import flatten, numpy_to_record, unflatten


def round_lr(round_: ClientRound) -> float:
    cfg = round_.cfg
    if not cfg.cosine_lr:
        return cfg.local_lr
    return cosine_lr(cfg.local_lr, round_.server_round - 1, cfg.num_server_rounds)


def committed_duals(saved: dict[str, np.ndarray], accepted_round: int, size: int):
    """(v, V) after committing the pending increment if the server accepted its round."""
    dual_mean = saved.get("dual-mean", np.zeros(size))
    dual_precision = saved.get("dual-precision", np.zeros(size))
    if "pending-round" in saved and int(saved["pending-round"]) == accepted_round:
        dual_mean = dual_mean + saved["pending-dual-mean"]
        dual_precision = dual_precision + saved["pending-dual-precision"]
    return dual_mean, dual_precision


def train(round_: ClientRound) -> RecordDict:
    cfg = round_.cfg
    model = round_.model_at()
    params = list(model.parameters())
    shapes = round_.received[records.ARRAYS]
    global_mean = flatten(shapes).astype(np.float64)
    global_precision = flatten(round_.received[records.PRECISION]).astype(np.float64)
    at_prior = bool(round_.config[records.AT_PRIOR])
    if at_prior:
        # The server has not updated yet: the received "global" is the prior N(0, 1/delta);
        # the weights still start from the shared initial network.
        global_mean = np.zeros_like(global_mean)

    saved = round_.state.load()
    dual_mean, dual_precision = committed_duals(
        saved, int(round_.config[records.ACCEPTED_ROUND]), global_mean.size
    )
    num_examples = len(round_.train)
    lr = round_lr(round_)

    if cfg.posterior == "diagonal":
        optimizer = build_optimizer(cfg, params, lr, num_examples, rho=cfg.admm_rho)
        if not isinstance(optimizer, IVONADMM):  # RunConfig rejects this combination
            raise TypeError("the diagonal BayesADMM client needs optimizer 'ivon'")
        if "momentum" in saved:
            optimizer.param_groups[0]["momentum"] = torch.as_tensor(saved["momentum"], dtype=params[0].dtype)
            optimizer.current_step = int(saved["step"])
        optimizer.set_prior(global_mean, global_precision)
        if not at_prior:  # start from the global posterior; in round 0 IVON starts at hess-init
            optimizer.set_posterior(global_mean, global_precision)
        optimizer.set_duals(dual_mean, dual_precision, num_examples, cfg.temperature)
        loss = _train(round_, model, optimizer)
        mean, precision = (t.detach().cpu().double().numpy() for t in optimizer.get_posterior())
        optimizer_state = {
            "momentum": optimizer.param_groups[0]["momentum"].cpu().numpy(),
            "step": np.int64(optimizer.current_step),
        }
    else:
        optimizer = build_optimizer(cfg, params, lr, num_examples)
        anchor = torch.as_tensor(global_mean, dtype=params[0].dtype, device=round_.device)
        dual = torch.as_tensor(dual_mean, dtype=params[0].dtype, device=round_.device)
        scale = cfg.temperature / num_examples

        def admm_terms() -> torch.Tensor:
            x = torch.cat([p.reshape(-1) for p in params])
            return scale * (-(dual @ x) + 0.5 * cfg.admm_rho * (x - anchor).square().sum())

        loss = _train(round_, model, optimizer, admm_terms)
        mean = flatten_params(params).cpu().double().numpy()
        precision = np.ones_like(mean)
        global_precision = np.ones_like(mean)
        optimizer_state = {}

    increment = client_dual_increment(
        global_mean, global_precision, mean, precision, cfg.admm_rho, cfg.dual_damping
    )
    round_.state.save(
        {
            "dual-mean": dual_mean,
            "dual-precision": dual_precision,
            "pending-dual-mean": increment[0],
            "pending-dual-precision": increment[1],
            "pending-round": np.int64(round_.server_round),
            **optimizer_state,
        },
        round_.server_round,
    )
    return RecordDict(
        {
            records.ARRAYS: numpy_to_record(unflatten(mean, shapes)),
            records.PRECISION: numpy_to_record(unflatten(precision, shapes)),
            records.METRICS: MetricRecord(
                {records.NUM_EXAMPLES: num_examples, "loss": loss, "lr": lr}
            ),
        }
    )


def _train(round_: ClientRound, model, optimizer, penalty=None) -> float:
    cfg = round_.cfg
    return train_epochs(
        model, round_.train, optimizer, cfg.local_epochs, cfg.batch_size, round_.device,
        round_.seed, penalty=penalty,
    )
