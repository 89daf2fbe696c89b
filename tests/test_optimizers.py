"""`build_optimizer`: the run config's IVON keys reach the optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from client_app.optimizers import build_optimizer
from task.config import ConfigError, parse_run_config


def _ivon(**keys):
    cfg = parse_run_config({"optimizer": "ivon", "hess-init": 0.01, **keys})
    weights = torch.nn.Parameter(torch.zeros(6))
    return weights, build_optimizer(cfg, [weights], lr=0.1, num_examples=100)


def test_clip_radius_zero_leaves_ivon_unclipped():
    _, optimizer = _ivon()
    assert all(math.isinf(group["clip_radius"]) for group in optimizer.param_groups)


def _first_step(**keys) -> torch.Tensor:
    """The weights after one IVON step from 0 on a linear loss with large gradients."""
    torch.manual_seed(0)  # the same weight draw for every call
    weights, optimizer = _ivon(**keys)
    gradient = torch.tensor([30.0, -30.0, 3.0, -3.0, 0.3, -0.3])
    with optimizer.sampled_params(train=True):
        optimizer.zero_grad()
        (weights * gradient).sum().backward()
    optimizer.step()
    return weights.detach().clone()


@pytest.mark.parametrize("radius", [0.05, 1.0])
def test_clip_radius_clips_each_coordinate_of_the_step_to_lr_times_the_radius(radius):
    # Clipping acts on g / (h + delta) after the Hessian update, coordinate by coordinate, so
    # the clipped step is the unclipped one clamped to +-lr * radius (lr 0.1), up to rounding.
    free = _first_step()
    clipped = _first_step(**{"clip-radius": radius})
    assert (free.abs() > 0.1 * radius).any() and (free.abs() < 0.1 * radius).any()
    assert torch.allclose(clipped, free.clamp(-0.1 * radius, 0.1 * radius), rtol=1e-6, atol=0)


def test_negative_clip_radius_is_refused():
    with pytest.raises(ConfigError, match="clip-radius"):
        parse_run_config({"optimizer": "ivon", "clip-radius": -1.0})
