"""Local optimizers; `build_optimizer` is the one place that maps a config name to one."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from task.config import RunConfig


def build_optimizer(
    cfg: RunConfig, params: Iterable[torch.nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
