"""The personalization math (task/personal.py) against exact answers."""

import math

import numpy as np
import pytest

from task.personal import interpolate_gaussians, interpolation_weight, worst_share_mean


def _gaussians(seed=0, size=7):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=size), rng.uniform(0.1, 5.0, size),  # global mean, precision
        rng.normal(size=size), rng.uniform(0.1, 5.0, size),  # local mean, precision
    )


def _log_density(x, mean, precision):
    return 0.5 * np.log(precision / (2 * np.pi)) - 0.5 * precision * (x - mean) ** 2


@pytest.mark.parametrize("lam", [0.25, 1.0, 3.0])
def test_interpolation_is_the_normalized_product_of_powers(lam):
    """N(m_g, 1/S_g)^(1-w) N(m_k, 1/S_k)^w, normalized, computed on a grid per coordinate."""
    mg, sg, mk, sk = _gaussians()
    w = lam / (1 + lam)
    mean, precision = interpolate_gaussians(mg, sg, mk, sk, lam)
    grid = np.linspace(-15, 15, 200_001)
    step = grid[1] - grid[0]
    for i in range(len(mg)):
        log_p = (1 - w) * _log_density(grid, mg[i], sg[i]) + w * _log_density(grid, mk[i], sk[i])
        density = np.exp(log_p - log_p.max())
        density /= density.sum() * step
        grid_mean = (grid * density).sum() * step
        grid_var = ((grid - grid_mean) ** 2 * density).sum() * step
        assert mean[i] == pytest.approx(grid_mean, abs=1e-6)
        assert precision[i] == pytest.approx(1 / grid_var, rel=1e-5)


def test_hand_computed_values():
    # S_g = 1, m_g = 0; S_k = 3, m_k = 2; lambda = 1 -> w = 1/2:
    # S = (1 + 3)/2 = 2, m = (0.5 * 1 * 0 + 0.5 * 3 * 2) / 2 = 1.5
    mean, precision = interpolate_gaussians(
        np.array([0.0]), np.array([1.0]), np.array([2.0]), np.array([3.0]), 1.0
    )
    assert precision[0] == 2.0 and mean[0] == 1.5


def test_lambda_zero_is_the_global_exactly():
    mg, sg, mk, sk = _gaussians(1)
    mean, precision = interpolate_gaussians(mg, sg, mk, sk, 0.0)
    np.testing.assert_array_equal(mean, mg)
    np.testing.assert_array_equal(precision, sg)


def test_lambda_to_infinity_tends_to_the_local():
    mg, sg, mk, sk = _gaussians(2)
    mean, precision = interpolate_gaussians(mg, sg, mk, sk, math.inf)
    np.testing.assert_array_equal(mean, mk)
    np.testing.assert_array_equal(precision, sk)
    errors = []
    for lam in (1e2, 1e4, 1e6):
        mean, precision = interpolate_gaussians(mg, sg, mk, sk, lam)
        errors.append(max(np.abs(mean - mk).max(), np.abs(precision - sk).max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4


def test_weight_and_refusals():
    assert interpolation_weight(0.0) == 0.0
    assert interpolation_weight(1.0) == 0.5
    assert interpolation_weight(math.inf) == 1.0
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="lambda"):
            interpolation_weight(bad)


def test_worst_share_mean():
    values = [0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.6, 0.2, 0.4, 1.0, 0.95]  # 11 nodes: worst 2
    assert worst_share_mean(values) == pytest.approx((0.1 + 0.2) / 2)
    assert worst_share_mean(values, higher_is_worse=True) == pytest.approx((1.0 + 0.95) / 2)
    assert worst_share_mean([0.4]) == 0.4
