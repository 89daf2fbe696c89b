import numpy as np
import pytest

import torch

from task.metrics import (
    TEMPERATURES, accuracy, brier, ece, fitted_temperature, nll, nll_by_temperature, predict_probs,
    tempered,
)


PROBS = np.array(
    [
        [0.9, 0.1],  # correct, conf 0.9
        [0.6, 0.4],  # wrong (label 1), conf 0.6
        [0.2, 0.8],  # correct, conf 0.8
        [0.45, 0.55],  # wrong (label 0), conf 0.55
    ]
)
LABELS = np.array([0, 1, 1, 0])


def test_accuracy_and_nll_by_hand():
    assert accuracy(PROBS, LABELS) == 0.5
    expected = -(np.log(0.9) + np.log(0.4) + np.log(0.8) + np.log(0.45)) / 4
    assert nll(PROBS, LABELS) == pytest.approx(expected, rel=1e-12)


def test_ece_by_hand_with_15_bins():
    # Bins of width 1/15, intervals (lo, hi]: 0.9 -> bin 13, 0.8 -> bin 11, 0.6 -> bin 8,
    # 0.55 -> bin 8. Bin 8 holds two wrong predictions with mean confidence 0.575.
    expected = (1 / 4) * abs(1 - 0.9) + (1 / 4) * abs(1 - 0.8) + (2 / 4) * abs(0 - 0.575)
    assert ece(PROBS, LABELS) == pytest.approx(expected, rel=1e-12)


def test_ece_bin_edges_are_closed_on_the_right():
    # Confidence exactly 2/15 belongs to the second bin (1/15, 2/15]; with 2 bins (0, .5], (.5, 1]
    # a confidence of exactly 0.5 sits in the first bin.
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    labels = np.array([1, 0])
    # argmax of [0.5, 0.5] is class 0: wrong. Bin 1: conf 0.5, acc 0; bin 2: conf 1, acc 1.
    assert ece(probs, labels, bins=2) == pytest.approx(0.5 * 0.5)


def test_perfectly_calibrated_predictions_have_zero_ece():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert ece(probs, np.array([0, 1])) == 0.0
    assert nll(probs, np.array([0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_brier_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    labels = np.array([0, 1])
    # (0.3^2 + 0.2^2 + 0.1^2 + 0.5^2 + 0.5^2 + 0) / 2
    assert brier(probs, labels) == pytest.approx((0.14 + 0.5) / 2)
    assert brier(np.eye(3), np.arange(3)) == 0.0
    assert brier(np.eye(3)[[1, 2, 0]], np.arange(3)) == 2.0


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.5, 0.8409, 1.0, 2.0])
def test_tempered_probabilities_equal_the_softmax_of_divided_logits(temperature):
    logits = np.random.default_rng(0).normal(scale=4.0, size=(50, 7))
    expected = _softmax(logits / temperature)
    np.testing.assert_allclose(tempered(_softmax(logits), temperature), expected, rtol=1e-12)


def test_predict_probs_divides_the_logits_by_the_temperature():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 4)
    x = np.random.default_rng(1).normal(size=(9, 5)).astype(np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).double().numpy()
    got = predict_probs(net, x, torch.device("cpu"), temperature=0.7)
    np.testing.assert_allclose(got, _softmax(logits / 0.7), rtol=1e-12)


def test_temperature_grid_spans_half_to_double_and_includes_one():
    assert TEMPERATURES[0] == 0.5 and TEMPERATURES[-1] == 2.0 and 1.0 in TEMPERATURES
    assert all(b / a == pytest.approx(2 ** (1 / 8), rel=1e-3) for a, b in zip(TEMPERATURES, TEMPERATURES[1:]))


def test_an_underconfident_predictor_is_fitted_a_temperature_below_one():
    # Labels drawn from softmax(z), predictions softmax(z / 1.5): too soft by 1.5, so dividing
    # their logits by about 1 / 1.5 = 0.667 restores the true probabilities.
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(20000, 5))
    labels = np.array([rng.choice(5, p=p) for p in _softmax(logits)])
    scores = nll_by_temperature(_softmax(logits / 1.5), labels)
    assert set(scores) == {f"nll-t{t:g}" for t in TEMPERATURES}
    assert fitted_temperature(scores) == pytest.approx(1 / 1.5, rel=0.05)
    # The overconfident side: predictions softmax(1.5 z) want T = 1.5.
    assert fitted_temperature(nll_by_temperature(_softmax(logits * 1.5), labels)) == pytest.approx(1.5, rel=0.05)


def test_no_temperature_is_fitted_from_incomplete_or_non_finite_reports():
    scores = {f"nll-t{t:g}": 1.0 + abs(t - 0.83) for t in TEMPERATURES}
    assert fitted_temperature(scores) == 0.8409
    assert fitted_temperature({}) is None
    assert fitted_temperature({k: v for k, v in list(scores.items())[1:]}) is None
    assert fitted_temperature(scores | {"nll-t1": float("nan")}) is None
