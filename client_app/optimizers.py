"""Local optimizers; `build_optimizer` is the one place that maps a config name to one."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from task.config import RunConfig
from task.ivon_admm import IVONADMM, effective_sample_size


def build_optimizer(
    cfg: RunConfig,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    num_examples: int,
    rho: float = 1.0,
) -> torch.optim.Optimizer:
    """SGD, or IVON with prior N(0, 1/prior-precision) at ess = N / (temperature * rho).

    `lr` is the step size of this round (`cfg.local_lr`, scheduled by some methods). rho is 1
    except for the BayesADMM client, whose ADMM penalty scales the prior's weight. IVON's beta2
    follows from the client's steps per round when `beta2 = "auto"` (`RunConfig.local_beta2`).
    """
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    ess = effective_sample_size(num_examples, cfg.temperature, rho)
    return IVONADMM(
        params,
        lr=lr,
        ess=ess,
        hess_init=cfg.hess_init,
        beta2=cfg.local_beta2(num_examples),
        mc_samples=cfg.mc_samples,
        weight_decay=cfg.prior_precision / ess,
        clip_radius=cfg.clip_radius or math.inf,
    )
