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

    forward = _forward_of(model)
    sampler = getattr(optimizer, "sampled_params", None)
    if sampler is None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(forward(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()
    losses = []
    for _ in range(optimizer.mc_samples):
        optimizer.zero_grad(set_to_none=True)
        with sampler(train=True):
            loss = loss_fn(forward(x), y)
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
        # One gather per epoch; each minibatch is then a contiguous slice with the same rows in
        # the same order as x[perm[start:stop]] (indexing per step costs two ops per step).
        x_epoch, y_epoch = x[perm], y[perm]
        for start in range(0, len(y), batch_size):
            stop = start + batch_size
            total += minibatch_step(
                model, optimizer, x_epoch[start:stop], y_epoch[start:stop], penalty
            )
            steps += 1
            if after_step is not None:
                after_step()
        if after_epoch is not None:
            after_epoch(epoch)
    return total / max(steps, 1)


def _forward_of(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's forward pass, with the layers of a hook-free `nn.Sequential` called directly.

    `module(x)` runs `nn.Module.__call__`'s hook machinery for every layer (tens of
    microseconds a layer, a sizeable share of a small network's step); without hooks it returns
    exactly `module.forward(x)`, so the computation, and every bit of it, is unchanged.
    """
    if type(model) is not nn.Sequential or not all(map(_hook_free, model.modules())):
        return model
    layers = [layer.forward for layer in model]

    def forward(x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            x = layer(x)
        return x

    return forward


def _hook_free(module: nn.Module) -> bool:
    return not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or nn.modules.module._global_backward_hooks
        or nn.modules.module._global_backward_pre_hooks
    )
