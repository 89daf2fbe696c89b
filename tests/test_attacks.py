"""The attack benchmark's hostile node (benchmarks/attacks.py): its attacks are what they claim,
it rewrites only the reply it should, and each attack meets the defence that stops it.

The FedAvg weight inflation and the scaled update with an honest count are also tested in
tests/test_robust_aggregation.py, the BayesADMM hijacks in tests/test_bayes_admm_math.py; here
every attack of the benchmark goes through the combiners and the reply bounds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from benchmarks.attacks import (
    ATTACKS,
    BOOST,
    GENERIC_ATTACKS,
    HIJACK_PRECISION,
    INFLATED_COUNT,
    NOISE_STD,
    SIGN_FLIP_SCALE,
    Reply,
    hostile_reply,
    model_replacement,
)
from strategies.bayes_admm import ReplySums, average_in_bounds, bound_reply, multi_krum_keep
from strategies.fedavg import weighted_mean
from strategies.robust import cap_weights, robust_combine
from task import records
from task.params import numpy_to_record, record_to_numpy
from tests.conftest import reply

RNG = np.random.default_rng


def test_each_attack_does_what_it_says():
    rng = RNG(0)
    global_model = rng.normal(size=50)
    honest = Reply(global_model + rng.normal(0, 0.1, 50), rng.uniform(1, 10, 50), 120)
    update = honest.model - global_model
    got = {name: attack(honest, global_model, RNG(1)) for name, attack in ATTACKS.items()}
    assert got["weight-inflation"] == (pytest.approx(np.zeros(50)), honest.precision, INFLATED_COUNT)
    np.testing.assert_allclose(got["model-replacement"].model, (1 - BOOST) * global_model)
    np.testing.assert_allclose(got["sign-flip"].model - global_model, -SIGN_FLIP_SCALE * update)
    noise = got["gaussian-noise"].model - global_model
    assert abs(noise.std() / NOISE_STD - 1) < 0.3 and abs(noise.mean()) < NOISE_STD / 2
    assert np.all(got["precision-hijack"].precision == HIJACK_PRECISION)
    assert np.all(got["precision-hijack"].model == 0)
    assert np.all(got["mean-hijack"].model == 1e30) and np.all(got["mean-hijack"].precision == 1)
    for name in ("model-replacement", "sign-flip", "gaussian-noise", "precision-hijack"):
        assert got[name].num_examples == honest.num_examples, name  # an honest count
    # Model replacement: with n - 1 honest replies at the global, the plain mean is the target.
    replaced = model_replacement(Reply(global_model, None, 1), global_model, RNG(0))
    mean = (replaced.model + (BOOST - 1) * global_model) / BOOST
    np.testing.assert_allclose(mean, 0, atol=1e-12)


def _train_message(arrays: dict, precision: dict | None = None) -> Message:
    content = RecordDict({records.ARRAYS: numpy_to_record(arrays), records.CONFIG: ConfigRecord({})})
    if precision is not None:
        content[records.PRECISION] = numpy_to_record(precision)
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("strategy", ["fedavg", "fedpa", "bayes-admm"])
def test_hostile_reply_rewrites_the_model_the_reply_implies(strategy):
    shapes = {"w": np.ones((2, 3), np.float32), "b": np.full(3, 2.0, np.float32)}
    sent = _train_message(shapes, shapes if strategy == "bayes-admm" else None)
    honest = {k: v + 0.5 for k, v in shapes.items()}
    if strategy == "fedpa":  # FedPA replies with the delta
        honest = {k: np.full_like(v, 0.5) for k, v in shapes.items()}
    content = RecordDict({
        records.ARRAYS: numpy_to_record(honest),
        records.METRICS: MetricRecord({records.NUM_EXAMPLES: 40, "loss": 0.3}),
    })
    if strategy == "bayes-admm":
        content[records.PRECISION] = numpy_to_record({k: np.full_like(v, 3.0) for k, v in shapes.items()})
    answer = hostile_reply(sent, reply(sent, content), GENERIC_ATTACKS["sign-flip"], strategy, RNG(0))
    arrays = record_to_numpy(answer.content.array_records[records.ARRAYS])
    # The honest update is +0.5 everywhere; the hostile one is -0.5 x SIGN_FLIP_SCALE.
    expected_update = -0.5 * SIGN_FLIP_SCALE
    for key, value in arrays.items():
        implied = value if strategy == "fedpa" else value - shapes[key]
        np.testing.assert_allclose(implied, expected_update)
        assert value.dtype == np.float32 and value.shape == shapes[key].shape
    metrics = answer.content.metric_records[records.METRICS]
    assert metrics[records.NUM_EXAMPLES] == 40 and metrics["loss"] == 0.3
    if strategy == "bayes-admm":  # the precision is passed on
        precision = record_to_numpy(answer.content.array_records[records.PRECISION])
        assert all(np.all(v == 3.0) for v in precision.values())
    assert answer.metadata.reply_to_message_id == sent.metadata.message_id


def _honest_deltas(rng, num_honest=9, size=40):
    """Honest updates: a common direction plus node-specific spread, with unequal counts."""
    direction = rng.normal(0, 1, size)
    return [direction + rng.normal(0, 0.5, size) for _ in range(num_honest)], \
        [int(c) for c in rng.integers(50, 200, num_honest)]


@pytest.mark.parametrize("attack", sorted(GENERIC_ATTACKS))
@pytest.mark.parametrize("defence", ["trimmed-mean", "median", "multi-krum", "recommended"])
def test_every_attack_meets_a_robust_combiner_that_ignores_it(attack, defence):
    """One hostile delta of ten moves the plain weighted mean far from the honest mean; the robust
    combiners (and the benchmark's recommended multi-krum with the weight cap) stay within the
    honest replies' spread."""
    rng = RNG(3)
    global_model = rng.normal(0, 1, 40)
    honest, counts = _honest_deltas(rng)
    honest_mean = weighted_mean([[d] for d in honest], counts)[0]
    spread = max(np.linalg.norm(d - honest_mean) for d in honest)
    node_one = Reply(global_model + honest[0], None, counts[0])
    hostile = ATTACKS[attack](node_one, global_model, RNG(4))
    deltas = [[hostile.model - global_model]] + [[d] for d in honest]
    weights = [hostile.num_examples, *counts]
    attacked = weighted_mean(deltas, weights)[0]
    assert np.linalg.norm(attacked - honest_mean) > 2 * spread  # the attack bites undefended
    if defence == "recommended":
        combined = robust_combine("multi-krum", deltas, cap_weights(weights, 0.2), byzantine=1)[0]
    else:
        combined = robust_combine(defence, deltas, weights, trim_fraction=0.2, byzantine=1)[0]
    assert np.linalg.norm(combined - honest_mean) <= spread


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_attack_on_bayes_admm_is_left_out_by_multi_krum(attack):
    """BayesADMM's recommended setting (`aggregation = "multi-krum"`): whatever the attack, the
    hostile reply (index 0) is left out, and the precision-weighted mean of the kept replies stays
    within the honest replies' spread around their own."""
    rng = RNG(7)
    global_mean, global_precision = rng.normal(size=30), rng.uniform(1e2, 1e4, 30)
    direction = rng.normal(0, 3, 30) / np.sqrt(global_precision)  # the honest nodes' common step
    honest = [
        Reply(global_mean + direction + rng.normal(0, 1, 30) / np.sqrt(global_precision),
              global_precision * rng.uniform(1, 2, 30), int(rng.integers(50, 200)))
        for _ in range(9)
    ]
    hostile = ATTACKS[attack](honest[0], global_mean, RNG(8))
    replies = [hostile, *honest]

    kept = multi_krum_keep([r.model for r in replies], global_precision, byzantine=1)

    assert 0 not in kept and len(kept) == 9

    def precision_weighted(rs):
        return sum(r.precision * r.model for r in rs) / sum(r.precision for r in rs)

    honest_mean = precision_weighted(honest)
    spread = max(np.max(np.abs(r.model - honest_mean) * np.sqrt(global_precision)) for r in honest)
    combined = precision_weighted([replies[i] for i in kept])
    assert np.max(np.abs(combined - honest_mean) * np.sqrt(global_precision)) <= spread


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_attack_on_bayes_admm_is_bounded_by_the_recommended_reply_bounds(attack):
    """precision-ratio-bound 100 and mean-shift-bound 10 (a setting of the benchmark): whatever
    the attack, the reply's precision stays within [S/100, 100 S] and its mean
    within 10 global standard deviations, per coordinate (a sign flip of a small update may
    already lie inside)."""
    rng = RNG(5)
    global_mean, global_precision = rng.normal(size=30), rng.uniform(1, 1e4, 30)
    honest = Reply(global_mean + rng.normal(0, 0.1, 30) / np.sqrt(global_precision),
                   global_precision * rng.uniform(1, 2, 30), 100)
    hostile = ATTACKS[attack](honest, global_mean, RNG(6))
    bounded = bound_reply(hostile.model, hostile.precision, global_mean, global_precision,
                          ratio_bound=100.0, precision_max=1e12, mean_shift_bound=10.0)
    assert np.all(bounded.precision <= 100 * global_precision * (1 + 1e-12))
    assert np.all(bounded.precision >= global_precision / 100 * (1 - 1e-12))
    reach = 10 / np.sqrt(global_precision)
    assert np.all(np.abs(bounded.mean - global_mean) <= reach * (1 + 1e-12))
    assert math.isfinite(float(np.sum(bounded.precision * bounded.mean)))


def test_out_of_bounds_coordinates_are_left_out_of_the_bayes_admm_average():
    """Three replies at four coordinates. Reply 3 is out of bounds everywhere; replies 1-2 are
    inside at coordinates 0-1, inside the mean bound only at 2, out of both at 3. The average
    takes replies 1-2 at 0-1, the mean-inside tier (replies 1-2, precision clipped) at 2, and
    every clipped reply at 3."""
    precisions = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([3.0, 2.0, 1.0, 4.0]),
                  np.array([100.0, 100.0, 100.0, 100.0])]
    means = [np.array([1.0, 1.0, 1.0, 1.0]), np.array([3.0, 3.0, 3.0, 3.0]),
             np.array([-9.0, -9.0, -9.0, -9.0])]
    inside = [np.array([True, True, False, False])] * 2 + [np.zeros(4, bool)]
    mean_inside = [np.array([True, True, True, False])] * 2 + [np.zeros(4, bool)]
    tiers = [ReplySums(), ReplySums(), ReplySums()]
    for s, m, ok, mean_ok in zip(precisions, means, inside, mean_inside):
        tiers = [tiers[0].add(s, m, ok), tiers[1].add(s, m, mean_ok), tiers[2].add(s, m)]
    precision, natural_mean = average_in_bounds(tiers)
    np.testing.assert_array_equal(precision, [2.0, 2.0, 2.0, 108 / 3])
    np.testing.assert_array_equal(natural_mean, [5.0, 4.0, 3.0, (4 + 12 - 900) / 3])
    # Every reply inside everywhere: the plain average, bit for bit.
    everywhere = ReplySums()
    for s, m in zip(precisions, means):
        everywhere = everywhere.add(s, m, np.ones(4, bool))
    precision, natural_mean = average_in_bounds([everywhere, everywhere, tiers[2]])
    assert precision.tobytes() == (sum(precisions) / 3).tobytes()
    assert natural_mean.tobytes() == (sum(s * m for s, m in zip(precisions, means)) / 3).tobytes()
