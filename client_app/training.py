"""The local training loop shared by every client method and optimizer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from task.data import ArrayData
from task.models import seed_torch


Penalty = Callable[[], torch.Tensor]


def minibatch_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    penalty: Penalty | None = None,
) -> float:
    """One optimizer step on the mean cross-entropy of (x, y) plus `penalty()`; returns the loss.

    Optimizers that sample weights (IVON) expose `sampled_params`: the gradient is taken at
    each sampled weight vector and the optimizer averages them in `step`.
    """
    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, labels)
        return loss if penalty is None else loss + penalty()

    sampler = getattr(optimizer, "sampled_params", None)
    if sampler is None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()
    losses = []
    for _ in range(optimizer.mc_samples):
        optimizer.zero_grad(set_to_none=True)
        with sampler(train=True):
            loss = loss_fn(model(x), y)
            loss.backward()
        losses.append(loss.item())
    optimizer.step()
    return sum(losses) / len(losses)


def train_epochs(
    model: nn.Module,
    data: ArrayData,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    device: torch.device,
    seed: int,
    after_step: Callable[[], None] | None = None,
    after_epoch: Callable[[int], None] | None = None,
    penalty: Penalty | None = None,
) -> float:
    """`epochs` passes over `data` in shuffled minibatches; returns the mean training loss."""
    model.train()
    seed_torch(seed)  # weight sampling (IVON) draws from the global generator
    order = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(data.x).to(device)
    y = torch.from_numpy(data.y).to(device)
    total, steps = 0.0, 0
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=order).to(device)
        for start in range(0, len(y), batch_size):
            idx = perm[start : start + batch_size]
            total += minibatch_step(model, optimizer, x[idx], y[idx], penalty)
            steps += 1
            if after_step is not None:
                after_step()
        if after_epoch is not None:
            after_epoch(epoch)
    return total / max(steps, 1)
