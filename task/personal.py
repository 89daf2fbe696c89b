"""Personalized models: the math, as pure functions on flat NumPy vectors.

`posterior` personalization interpolates, in natural parameters, between the global Gaussian
N(m_g, diag(S_g)^-1) and a node's local posterior N(m_k, diag(S_k)^-1) (Jamoussi et al.,
"cost-free personalization"): with w = lambda / (1 + lambda) (`personal-weight` = lambda)

    S = (1 - w) S_g + w S_k,        m = S^-1 ((1 - w) S_g m_g + w S_k m_k),

the normalized product N(m_g, S_g^-1)^(1 - w) N(m_k, S_k^-1)^w. lambda = 0 gives the global,
lambda -> infinity the local posterior. `worst_share_mean` is the statistic a server reports for
the worst nodes.
"""

from __future__ import annotations

import math

import numpy as np

PERSONAL_PREFIX = "personal"  # a node's personal model file: personal-<state key>-<identity>.npz
# `personal-weight = "auto"`: the lambdas a node tries on its validation split (inf: local).
AUTO_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 32.0, math.inf)


def interpolation_weight(lam: float) -> float:
    """w = lambda / (1 + lambda) in [0, 1]; lambda = inf gives 1."""
    if not lam >= 0:  # also refuses NaN
        raise ValueError(f"personal weight lambda must be >= 0, got {lam}")
    return 1.0 if math.isinf(lam) else lam / (1.0 + lam)


def interpolate_gaussians(
    global_mean: np.ndarray,
    global_precision: np.ndarray,
    local_mean: np.ndarray,
    local_precision: np.ndarray,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(m, S) of the Gaussian between the global and the local one (module docstring)."""
    w = interpolation_weight(lam)
    if w == 0.0:  # exactly the global, not a rounding of it
        return np.array(global_mean, copy=True), np.array(global_precision, copy=True)
    if w == 1.0:
        return np.array(local_mean, copy=True), np.array(local_precision, copy=True)
    precision = (1.0 - w) * global_precision + w * local_precision
    if not (precision > 0).all():
        raise ValueError("interpolated precision is not positive: precisions must be > 0")
    natural = (1.0 - w) * global_precision * global_mean + w * local_precision * local_mean
    return natural / precision, precision


def worst_share_mean(values: list[float], share: float = 0.1, higher_is_worse: bool = False) -> float:
    """Mean of the worst ceil(share * n) values (at least one): the lowest, or the highest when
    `higher_is_worse` (NLL, ECE)."""
    if not values:
        raise ValueError("no values")
    count = max(1, math.ceil(share * len(values)))
    ordered = sorted(values, reverse=higher_is_worse)
    return float(np.mean(ordered[:count]))
