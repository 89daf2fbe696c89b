"""The local training loop computes exactly what the plain textbook loop computes.

`train_epochs` takes shortcuts for speed (one gather per epoch, the layers of a hook-free
Sequential called directly, SGD's foreach kernels); none may change a single bit of the result.
The reference below is the loop as first written: per-step indexing, `model(x)`, a for-each-
parameter SGD. Both run on MNIST-1D's CNN (the benchmarks' hot path), with SGD and with IVON.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from client_app.optimizers import build_optimizer
from client_app.training import train_epochs
from task.config import parse_run_config
from task.data import OFFLINE_SPECS, ArrayData
from task.models import build_model, seed_torch

DEFAULTS = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
EPOCHS, BATCH, SEED = 2, 32, 7


def _reference_train(model, data, optimizer, penalty=None) -> float:
    seed_torch(SEED)
    order = torch.Generator().manual_seed(SEED)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    total, steps = 0.0, 0
    for _ in range(EPOCHS):
        perm = torch.randperm(len(y), generator=order)
        for start in range(0, len(y), BATCH):
            idx = perm[start : start + BATCH]
            samples = getattr(optimizer, "mc_samples", None)
            losses = []
            for _ in range(samples or 1):
                optimizer.zero_grad(set_to_none=True)
                if samples is None:
                    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                    loss = loss if penalty is None else loss + penalty()
                    loss.backward()
                else:
                    with optimizer.sampled_params(train=True):
                        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                        loss = loss if penalty is None else loss + penalty()
                        loss.backward()
                losses.append(loss.item())
            optimizer.step()
            total += sum(losses) / len(losses)
            steps += 1
    return total / steps


def _weights(model) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


@pytest.mark.parametrize(
    "overrides",
    [
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight-decay": 1e-4},
        {"optimizer": "ivon", "lr": 0.01, "mc-samples": 2},
    ],
    ids=["sgd", "ivon"],
)
@pytest.mark.parametrize("with_penalty", [False, True], ids=["plain", "penalty"])
def test_train_epochs_is_bit_identical_to_the_plain_loop(overrides, with_penalty):
    cfg = parse_run_config({**DEFAULTS, "dataset": "mnist1d", "model": "cnn1d", **overrides})
    rng = np.random.default_rng(0)
    data = ArrayData(  # 150 rows: the last minibatch of each epoch is a short one
        rng.standard_normal((150, 40)).astype(np.float32), rng.integers(0, 10, 150)
    )
    results = []
    for loop in ("fast", "reference"):
        model = build_model(cfg, OFFLINE_SPECS["mnist1d"])
        params = list(model.parameters())
        anchor = [p.detach().clone() for p in params]
        penalty = (lambda: sum((p - a).square().sum() for p, a in zip(params, anchor))) if (
            with_penalty
        ) else None
        if loop == "reference" and cfg.optimizer == "sgd":  # the per-parameter Python loop
            optimizer = torch.optim.SGD(
                params, lr=cfg.local_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                foreach=False,
            )
        else:
            optimizer = build_optimizer(cfg, params, cfg.local_lr, len(data))
        if loop == "fast":
            loss = train_epochs(
                model, data, optimizer, EPOCHS, BATCH, torch.device("cpu"), SEED, penalty=penalty
            )
        else:
            loss = _reference_train(model, data, optimizer, penalty)
        results.append((loss, _weights(model)))
    (fast_loss, fast_weights), (ref_loss, ref_weights) = results
    assert fast_loss == ref_loss
    assert np.array_equal(fast_weights, ref_weights)
    assert not np.array_equal(fast_weights, _weights(build_model(cfg, OFFLINE_SPECS["mnist1d"])))


def test_a_model_with_hooks_is_called_as_a_module():
    """A forward hook must still run: the direct layer calls are for hook-free models only."""
    cfg = parse_run_config({**DEFAULTS, "dataset": "mnist1d", "model": "cnn1d"})
    model = build_model(cfg, OFFLINE_SPECS["mnist1d"])
    calls = []
    model[2].register_forward_hook(lambda *_: calls.append(1))
    optimizer = build_optimizer(cfg, model.parameters(), 0.01, 64)
    data = ArrayData(np.zeros((64, 40), np.float32), np.zeros(64, np.int64))
    train_epochs(model, data, optimizer, 1, BATCH, torch.device("cpu"), SEED)
    assert len(calls) == 2  # one per minibatch
