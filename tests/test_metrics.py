import numpy as np
import pytest

from task.metrics import accuracy, brier, ece, nll


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
