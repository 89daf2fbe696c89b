"""Uncertainty metrics against hand-computed answers, and the offline OOD and shifted inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server_app.outputs import strict_json_entry
from server_app.uncertainty import (
    Predictive,
    UncertaintyEvaluation,
    entropy_quantiles,
    predictive_metrics,
)
from task.config import parse_run_config
from task.data import ArrayData
from task.metrics import ece, reliability_bins
from task.ood import (
    OOD_BUILDERS,
    SHIFT_LEVELS,
    digits_ood,
    mnist1d_ood,
    ood_sets,
    shifted_sets,
)
from task.uncertainty import (
    aurc,
    draws_mutual_information,
    entropy_threshold,
    mutual_information,
    ood_auroc,
    predictive_entropy,
    selective_accuracy,
)

LN2 = math.log(2)


# ----------------------------------------------------------------------------- metrics


def test_predictive_entropy_in_nats():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]])
    expected = [0.0, LN2, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    np.testing.assert_allclose(predictive_entropy(probs), expected, rtol=1e-15, atol=1e-15)
    assert predictive_entropy(np.full((1, 4), 0.25))[0] == pytest.approx(math.log(4), rel=1e-15)


def test_mutual_information_is_the_disagreement_between_draws():
    # two confident draws that disagree: the mean is 50/50 (ln 2), each draw has entropy 0
    disagree = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert draws_mutual_information(disagree)[0] == pytest.approx(LN2, rel=1e-15)
    # two identical uncertain draws: all the entropy is the draws' own, none is disagreement
    agree = np.array([[[0.5, 0.5]], [[0.5, 0.5]]])
    assert draws_mutual_information(agree)[0] == 0.0
    # draws (0.9, 0.1) and (0.5, 0.5): H[(0.7, 0.3)] - (H[(0.9, 0.1)] + ln 2) / 2
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    mixed = np.array([[[0.9, 0.1]], [[0.5, 0.5]]])
    assert draws_mutual_information(mixed)[0] == pytest.approx(h(0.7) - (h(0.9) + LN2) / 2)
    # from the streamed sums bma_probs keeps: the same
    assert mutual_information(np.array([[0.7, 0.3]]), np.array([(h(0.9) + LN2) / 2]))[0] == (
        pytest.approx(h(0.7) - (h(0.9) + LN2) / 2)
    )


@pytest.mark.parametrize(
    ("score_in", "score_out", "expected"),
    [
        ([0.1, 0.2], [0.3, 0.4], 1.0),  # every OOD input more uncertain
        ([0.3, 0.4], [0.1, 0.2], 0.0),
        ([0.1, 0.4], [0.2, 0.3], 0.5),  # 2 of 4 pairs ordered
        ([0.1, 0.3, 0.5], [0.2, 0.6], 4 / 6),
        ([0.2], [0.2, 0.3], 0.75),  # a tie counts half
    ],
)
def test_ood_auroc_counts_ordered_pairs(score_in, score_out, expected):
    assert ood_auroc(np.array(score_in), np.array(score_out)) == pytest.approx(expected, abs=1e-15)


def test_selective_accuracy_and_aurc():
    correct = np.array([True, False, True, True, False])
    uncertainty = np.array([0.1, 0.5, 0.2, 0.3, 0.9])
    # answered in order 0, 2, 3 (right), 1, 4 (wrong): error rates 0, 0, 0, 1/4, 2/5
    assert selective_accuracy(correct, uncertainty, 0.6) == 1.0
    assert selective_accuracy(correct, uncertainty, 0.8) == 0.75
    assert selective_accuracy(correct, uncertainty, 0.9) == 0.6  # ceil(4.5) = 5 answered
    assert selective_accuracy(correct, uncertainty, 1.0) == 0.6
    assert aurc(correct, uncertainty) == pytest.approx((0.25 + 0.4) / 5, abs=1e-15)
    # the reverse ranking answers the wrong ones first
    assert selective_accuracy(correct, -uncertainty, 0.4) == 0.0
    # ties keep input order
    assert selective_accuracy(np.array([False, True]), np.zeros(2), 0.5) == 0.0
    with pytest.raises(ValueError, match="coverage"):
        selective_accuracy(correct, uncertainty, 0.0)


def test_reliability_bins_and_ece():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.55, 0.45], [0.2, 0.8]])
    labels = np.array([0, 1, 0, 1])
    share, accuracy, confidence = reliability_bins(probs, labels, bins=4)
    # confidences 0.9, 0.6, 0.55, 0.8: bins (0.5, 0.75] and (0.75, 1] hold two each
    np.testing.assert_array_equal(share, [0.0, 0.0, 0.5, 0.5])
    np.testing.assert_array_equal(np.isnan(accuracy), [True, True, False, False])
    np.testing.assert_allclose(accuracy[2:], [0.5, 1.0])
    np.testing.assert_allclose(confidence[2:], [0.575, 0.85])
    assert ece(probs, labels, bins=4) == pytest.approx(0.5 * 0.075 + 0.5 * 0.15, abs=1e-15)


def test_entropy_threshold_interpolates_the_quantiles():
    quantiles = np.array([0.0, 1.0, 2.0])  # at coverages 0, 0.5, 1
    assert entropy_threshold(quantiles, 0.75) == 1.5
    assert entropy_threshold(quantiles, 1.0) == 2.0


def test_predictive_metrics_names_every_number():
    labels = np.array([0, 1, 0, 1])
    test = Predictive(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]), np.full(4, 0.1))
    ood = {"noise": Predictive(np.full((3, 2), 0.5), np.full(3, 0.2))}
    metrics = predictive_metrics(test, ood, {"0.5": test}, labels)
    # entropies: test 0.325, 0.500, 0.673, ln 2 (largest, wrong by argmax's tie to class 0)
    assert metrics["ood_auroc_entropy"] == {"noise": pytest.approx(7 / 8)}  # a tie at ln 2
    assert metrics["ood_auroc_mi"] == {"noise": 1.0}
    assert metrics["selective_accuracy_80"] == 0.75  # ceil(0.8 * 4) = 4 answered
    assert selective_accuracy(test.probs.argmax(1) == labels, test.entropy, 0.75) == 1.0
    assert metrics["aurc"] == pytest.approx(0.25 / 4)  # error rates 0, 0, 0, 1/4
    assert metrics["shift"]["0.5"]["accuracy"] == 0.75
    reliability = metrics["reliability"]
    assert reliability["share"][13] == 0.25 and reliability["accuracy"][13] == 1.0  # 0.9: (13/15, 14/15]
    assert reliability["accuracy"][0] is None and sum(reliability["share"]) == 1.0


def test_a_diverged_model_gives_nulls_not_an_error():
    nan = Predictive(np.full((3, 2), np.nan), np.full(3, np.nan))
    metrics = predictive_metrics(nan, {"noise": nan}, {"1": nan}, np.array([0, 1, 0]))
    assert math.isnan(metrics["ood_auroc_entropy"]["noise"])
    assert math.isnan(metrics["ood_auroc_mi"]["noise"])
    cleaned = strict_json_entry({"uncertainty": metrics})
    assert cleaned["uncertainty"]["ood_auroc_entropy"]["noise"] is None
    assert "uncertainty.ood_auroc_entropy.noise" in cleaned["not_finite"]
    assert entropy_quantiles(nan.entropy) is None  # model.json then records none
    assert entropy_quantiles(np.array([0.5, 0.1, 0.3]))[::50] == [0.1, 0.3, 0.5]


# ----------------------------------------------------------------------------- OOD inputs


def test_digits_ood_transforms_act_on_raw_pixels_then_scale():
    raw = np.random.default_rng(0).integers(0, 17, (5, 8, 8))
    x = (raw / 16.0).astype(np.float32).reshape(5, 1, 8, 8)  # task.data's preprocessing
    sets = digits_ood(x, np.random.default_rng(1))
    assert set(sets) == {"noise", "inverted", "rotated"}
    for values in sets.values():
        assert values.shape == x.shape and values.dtype == np.float32
        assert 0.0 <= values.min() and values.max() <= 1.0 and not np.array_equal(values, x)
    np.testing.assert_array_equal(sets["inverted"], ((16 - raw) / 16.0).astype(np.float32)[:, None])
    np.testing.assert_array_equal(sets["rotated"][:, 0], np.rot90(x[:, 0], axes=(1, 2)))
    assert sets["rotated"][0, 0, 7, 0] == x[0, 0, 0, 0]  # the top-left pixel goes bottom-left
    assert len(np.unique(sets["noise"])) > 100  # continuous noise, not a copy of the digits


@pytest.mark.parametrize("shape", [(6, 40), (6, 1, 40)])
def test_mnist1d_ood_signals(shape):
    x = np.random.default_rng(2).normal(0.5, 2.0, shape).astype(np.float32)
    sets = mnist1d_ood(x, np.random.default_rng(3))
    assert set(sets) == {"reversed", "shuffled", "noise"}
    signals = x.reshape(6, 40)
    for name, values in sets.items():
        assert values.shape == shape and values.dtype == np.float32, name
        assert not np.array_equal(values, x), name
    np.testing.assert_array_equal(sets["reversed"].reshape(6, 40)[:, ::-1], signals)
    shuffled = sets["shuffled"].reshape(6, 40)
    np.testing.assert_array_equal(np.sort(shuffled, axis=1), np.sort(signals, axis=1))
    assert not any(np.array_equal(shuffled[i], signals[i]) for i in range(6))
    noise = sets["noise"]
    assert abs(noise.mean() - x.mean()) < 0.5 and abs(noise.std() - x.std()) < 0.5


@pytest.mark.parametrize("dataset", ["digits", "mnist1d", "synthetic", "some/hf-dataset"])
def test_ood_sets_are_seeded(dataset):
    shape = {"digits": (7, 1, 8, 8), "mnist1d": (7, 40)}.get(dataset, (7, 60))
    x = np.random.default_rng(4).uniform(0, 1, shape).astype(np.float32)
    first, again, other = ood_sets(dataset, x, 5), ood_sets(dataset, x, 5), ood_sets(dataset, x, 6)
    assert set(first) == set(again) and "noise" in first
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["noise"], other["noise"])
    assert set(OOD_BUILDERS) >= {"digits", "mnist1d", "synthetic"}


def test_noise_stays_in_each_features_test_range():
    x = np.stack([np.linspace(0, 1, 9), np.linspace(5, 6, 9)], axis=1).astype(np.float32)
    noise = ood_sets("synthetic", x, 0)["noise"]
    assert noise[:, 0].min() >= 0 and noise[:, 0].max() <= 1
    assert noise[:, 1].min() >= 5 and noise[:, 1].max() <= 6


def test_shifted_sets_scale_one_noise_draw():
    x = np.random.default_rng(5).uniform(0, 1, (20, 3)).astype(np.float32)
    sets = shifted_sets(x, seed=1)
    assert list(sets) == [f"{level:g}" for level in SHIFT_LEVELS]
    small, large = (sets[f"{level:g}"] - x for level in (SHIFT_LEVELS[0], SHIFT_LEVELS[-1]))
    np.testing.assert_allclose(small * (SHIFT_LEVELS[-1] / SHIFT_LEVELS[0]), large, atol=1e-5)
    assert np.std(large) == pytest.approx(SHIFT_LEVELS[-1] * np.std(x), rel=0.25)
    np.testing.assert_array_equal(shifted_sets(x, seed=1)["1"], sets["1"])


@pytest.mark.parametrize(("every", "rounds"), [(0, [5]), (2, [2, 4, 5]), (1, [1, 2, 3, 4, 5])])
def test_uncertainty_is_evaluated_every_n_rounds_and_after_the_last(every, rounds):
    cfg = parse_run_config({"num-server-rounds": 5, "uncertainty-eval-every": every})
    test = ArrayData(np.zeros((4, 1, 8, 8), np.float32), np.arange(4))
    evaluation = UncertaintyEvaluation(cfg, test)
    assert [r for r in range(1, 6) if evaluation.due(r)] == rounds
