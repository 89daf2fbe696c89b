"""Client half of BayesADMM (IVON-ADMM): local solve, dual update, lasting state.

Diagonal posterior: IVON with the received global as prior and the client's duals
(`task.ivon_admm.IVONADMM`). Isotropic posterior (fixed unit covariance, classic federated
ADMM): the optimizer of the run config on l_k(x) - (tau/N_k) v_k.x + (tau rho/2N_k)||x - m~||^2.

Dual bookkeeping under partial participation: the increment of this round is kept *pending*
and committed at the start of the node's next round only if the server says it accepted this
round's reply (`accepted-round`); a reply that was lost, late or rejected leaves the duals as
they were, so the server's running dual sums always equal the sum of what the clients hold.
A node asked to go on from an accepted round whose state it no longer has answers with an error
(`check_state_covers`), never with zero duals.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client_app.compression import encode_reply
from client_app.local import ClientRound
from client_app.optimizers import build_optimizer
from client_app.state import ClientStateError
from client_app.training import train_epochs
from strategies.bayes_admm import client_dual_increment, cosine_lr
from task import records
from task.ivon_admm import IVONADMM
from task.params import flatten


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


def accepted_round_of(config, client_id: str) -> int:
    """The last round whose reply from this node the server used: sent for the node, or looked
    up in the table sent to nodes the (resumed) run does not know yet."""
    if records.ACCEPTED_ROUND in config:
        return int(config[records.ACCEPTED_ROUND])
    table = dict(zip(config[records.ACCEPTED_CLIENTS], config[records.ACCEPTED_ROUNDS]))
    return int(table.get(client_id, 0))


def check_state_covers(saved: dict[str, np.ndarray], accepted_round: int, where: str) -> None:
    """Refuse to go on without the duals the server's sums hold for this node.

    The server added this node's increments up to `accepted_round` to its dual sums; state saved
    in an earlier round than that (or none) has lost some of them, and training on zeros would
    break sum_k v_k for the rest of the run. The IVON momentum and step are saved with the duals;
    a node the server never accepted (`accepted_round` 0) may start afresh, duals zero on both
    sides.
    """
    if accepted_round <= 0:
        return
    saved_round = int(saved["pending-round"]) if "pending-round" in saved else None
    if saved_round is not None and saved_round >= accepted_round:
        return
    held = "no client state" if saved_round is None else f"client state of round {saved_round} only"
    raise ClientStateError(
        f"BayesADMM client state lost: the server's dual sums hold this node's duals up to round "
        f"{accepted_round}, the node has {held} ({where}), so it does not train (its duals "
        "would disagree with the server's); restore the state file or start a new run"
    )


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
    accepted_round = accepted_round_of(round_.config, round_.state.client_id)
    check_state_covers(saved, accepted_round, round_.state.where())
    dual_mean, dual_precision = committed_duals(saved, accepted_round, global_mean.size)
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
        mean = flatten(params).cpu().double().numpy()
        precision = np.ones_like(mean)
        global_precision = np.ones_like(mean)
        optimizer_state = {}

    # The increment from what the server decodes (a lossy codec changes it), as the server does.
    sent, decoded = encode_reply(
        round_, {records.ARRAYS: mean, records.PRECISION: precision}, shapes
    )
    mean, precision = decoded[records.ARRAYS], decoded[records.PRECISION]
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
            records.ARRAYS: sent[records.ARRAYS],
            records.PRECISION: sent[records.PRECISION],
            records.METRICS: MetricRecord(
                {records.NUM_EXAMPLES: num_examples, "loss": loss, "lr": lr}
            ),
            records.CONFIG: ConfigRecord({records.CLIENT_ID: round_.state.client_id}),
        }
    )


def _train(round_: ClientRound, model, optimizer, penalty=None) -> float:
    cfg = round_.cfg
    return train_epochs(
        model, round_.train, optimizer, cfg.local_epochs, cfg.batch_size, round_.device,
        round_.seed, penalty=penalty,
    )
