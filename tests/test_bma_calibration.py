"""The posterior BayesADMM samples from and saves: its precision calibrated to the data's scale
(`strategies.bayes_admm.calibrated_precision`, docs/ALGORITHMS.md), and a Bayesian model average
that with the defaults is no worse than the network at the mean."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from benchmarks.inprocess import simulate
from strategies.bayes_admm import (
    DualSums,
    accumulate_duals,
    calibrated_precision,
    client_dual_increment,
    server_update_from_averages,
)
from task.config import AUTO_BETA2_SHARE, parse_run_config

K, P, RHO, DELTA = 4, 6, 0.5, 0.7


def _run_share_clients(share: float, damping: float, rounds: int, initial_duals: np.ndarray):
    """The server update against clients whose IVON average holds the share `share` of their
    curvature c_k plus duals (S_k = S~_g + share (c_k + V_k) / rho), the precision half of the
    round exactly as the strategy runs it. Returns (S_g, sum V_k, sum c_k)."""
    rng = np.random.default_rng(0)
    curvature = rng.uniform(1.0, 50.0, size=(K, P))
    duals = initial_duals.copy()
    global_precision = np.full(P, DELTA)
    zeros = np.zeros(P)
    for _ in range(rounds):
        client_precisions = global_precision + share * (curvature + duals) / RHO
        increments = [
            client_dual_increment(zeros, global_precision, zeros, s_k, RHO, damping)
            for s_k in client_precisions
        ]
        sums = accumulate_duals(DualSums(zeros, duals.sum(axis=0)), increments)
        duals = duals + np.array([dV for _, dV in increments])
        assert np.allclose(sums.precision, duals.sum(axis=0))
        update = server_update_from_averages(
            client_precisions.mean(axis=0), zeros, zeros, duals.sum(axis=0), RHO, DELTA, K
        )
        global_precision = update.precision
    return global_precision, duals.sum(axis=0), curvature.sum(axis=0)


@pytest.mark.parametrize("share", [AUTO_BETA2_SHARE, 0.3, 1.0])
def test_calibration_recovers_the_pooled_precision_for_any_duals(share):
    """Frozen duals (damping 0) of any size: S_g settles at delta + s sum c - (1 - s) sum V, and
    the calibration gives delta + sum c, the pooled (centralized) precision, exactly."""
    duals = np.random.default_rng(1).uniform(-0.5, 0.5, size=(K, P))
    global_precision, dual_sum, pooled = _run_share_clients(share, 0.0, 400, duals)
    expected_raw = DELTA + share * pooled - (1 - share) * dual_sum
    np.testing.assert_allclose(global_precision, expected_raw, rtol=1e-10)
    np.testing.assert_allclose(
        calibrated_precision(global_precision, dual_sum, DELTA, share), DELTA + pooled, rtol=1e-10
    )


def test_with_converged_duals_raw_and_calibrated_precision_agree():
    """gamma = 1: the duals converge, every S_k equals S_g and S_g = delta + sum c (spec section
    8) whatever the share; the calibration then changes nothing."""
    global_precision, dual_sum, pooled = _run_share_clients(0.3, 1.0, 400, np.zeros((K, P)))
    np.testing.assert_allclose(global_precision, DELTA + pooled, rtol=1e-9)
    np.testing.assert_allclose(
        calibrated_precision(global_precision, dual_sum, DELTA, 0.3), DELTA + pooled, rtol=1e-9
    )


def test_negative_curvature_estimates_keep_the_global_precision():
    """Coordinates where the clients' curvature came out negative (S_g below the prior) are not
    scaled further down: the calibrated precision is at least S_g, so positive where S_g is."""
    global_precision = np.array([0.9, 0.2, 1e-6, 5.0])
    duals = np.array([0.0, 0.0, 0.0, 0.0])
    calibrated = calibrated_precision(global_precision, duals, 1.0, AUTO_BETA2_SHARE)
    np.testing.assert_array_equal(calibrated[:3], global_precision[:3])
    assert calibrated[3] == pytest.approx(1.0 + 4.0 / AUTO_BETA2_SHARE)
    assert (calibrated > 0).all()


def test_a_full_share_is_the_identity_and_a_share_outside_0_1_is_refused():
    precision, duals = np.array([1.0, 5.0]), np.array([-2.0, 3.0])
    assert np.array_equal(calibrated_precision(precision, duals, 1.0, 1.0), precision)
    for share in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="curvature share"):
            calibrated_precision(precision, duals, 1.0, share)


def test_curvature_share_follows_beta2_and_the_steps_per_round():
    auto = parse_run_config({"strategy": "bayes-admm", "optimizer": "ivon"})
    assert auto.curvature_share(115) == pytest.approx(AUTO_BETA2_SHARE, rel=1e-12)
    fixed = parse_run_config({"strategy": "bayes-admm", "optimizer": "ivon", "beta2": 0.99})
    steps = fixed.steps_per_round(115)
    assert fixed.curvature_share(115) == pytest.approx(1 - 0.99**steps, rel=1e-12)


def test_bma_is_no_worse_than_the_mean_with_the_defaults(tmp_path):
    """A small federation on its defaults: the sampled posterior (calibrated) predicts at least
    as well as the network at its mean, round after round once it has learned, both at the
    temperature the run fits on its nodes' held-out data (`predictive-temperature = "auto"`)."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    keys = {"strategy": "bayes-admm", "optimizer": "ivon", "dataset": "digits",
            "partitioner": "dirichlet", "dirichlet-alpha": 0.1, "num-server-rounds": 8,
            "seed": 0, "output-dir": str(tmp_path)}
    rounds = simulate(keys, 4).results["rounds"]
    learned = [r for r in rounds if r["accuracy"] >= 0.5]
    assert len(learned) >= 3, [r["accuracy"] for r in rounds]
    assert any(r["temperature"] != 1.0 for r in rounds), [r["temperature"] for r in rounds]
    for r in learned:
        # 2%: the Monte Carlo error of 32 weight draws; uncalibrated, the gap was 7% to 50%.
        assert r["bma_nll"] <= 1.02 * r["nll"], (r["round"], r["bma_nll"], r["nll"])
