"""Property tests (hypothesis) for every aggregation function and every strategy's reply checks.

Adversarial inputs throughout: NaN and Inf, zeros, huge values (1e30, and values that overflow
float64), mismatched shapes, and empty sets of replies. What these tests pin down:

- `weighted_mean([], [])` is None, exactly like all-zero weights: no client contributed, so there
  is no mean and the caller skips the round. It is not an error.
- Shapes never broadcast. A client array, mean delta, momentum buffer or BayesADMM vector whose
  shape differs from the others' is a ValueError, even where NumPy could broadcast it.
- A FedAvg/FedPA round whose mean delta or resulting params/buffer are not finite is skipped, and
  the params and buffer come back bitwise unchanged.
- BayesADMM's server update always returns a valid Gaussian (finite mean, finite positive
  precision). A coordinate uses the closed form when the closed form gives a finite positive
  precision and a finite mean; every other coordinate falls back to the precision-weighted average
  of the replies, and `fallback_coords` counts exactly those coordinates.
- A strategy uses exactly the valid replies, counts the others in `last_round` (client errors as
  failed, the rest as rejected), and ends the round in the same state as a twin strategy that
  only ever saw the valid replies. With fewer than min-train-nodes valid replies (an empty set of
  replies included) the round is skipped and the global state stays bitwise unchanged.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from strategies import STRATEGIES
from strategies.bayes_admm import (
    BayesADMM,
    DualSums,
    accumulate_duals,
    bound_reply,
    client_dual_increment,
    cosine_lr,
    multi_krum_keep,
    server_update,
)
from strategies.fedavg import aggregate_round, server_sgd_step, weighted_mean
from task import records
from strategies.robust import cap_weights, clip_update, robust_combine
from task.config import parse_run_config
from task.params import flatten, record_to_numpy, unflatten
from tests.conftest import FakeGrid, reply

# A modest number of examples keeps this file well under a minute; PROPERTY_EXAMPLES=2000 (say)
# runs a longer search.
EXAMPLES = int(os.environ.get("PROPERTY_EXAMPLES", "60"))
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
STRATEGY_PROPERTY = settings(
    max_examples=max(1, EXAMPLES * 2 // 3),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
overflow_ok = pytest.mark.filterwarnings("ignore::RuntimeWarning")

HUGE = 1e30
FLOAT_DTYPES = (np.float32, np.float64)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=3)


# ---------------------------------------------------------------------------- generators


def finite(dtype=np.float64, bound=HUGE):
    """Finite values of `dtype` in [-bound, bound], with zeros and the bounds themselves often."""
    width = 32 if np.dtype(dtype) == np.float32 else 64
    bound = float(np.asarray(bound, dtype))
    return st.one_of(
        st.sampled_from([0.0, -0.0, bound, -bound]),
        st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=width),
    )


def non_finite():
    return st.sampled_from([math.nan, math.inf, -math.inf])


def example_counts(size: int):
    """Positive weights: example counts, and arbitrary positive floats."""
    return st.lists(
        st.one_of(st.integers(1, 10**6), st.floats(1e-3, 1e6)), min_size=size, max_size=size
    )


@st.composite
def client_deltas(draw, min_clients=1, max_clients=5, bound=HUGE, dtype=None, shapes=None):
    """(deltas, shapes, dtype): every client sends one array per tensor, all in one dtype."""
    dtype = dtype or draw(st.sampled_from(FLOAT_DTYPES))
    shapes = shapes or draw(st.lists(SHAPES, min_size=1, max_size=3))
    count = draw(st.integers(min_clients, max_clients))
    deltas = [
        [draw(hnp.arrays(dtype, shape, elements=finite(dtype, bound))) for shape in shapes]
        for _ in range(count)
    ]
    return deltas, shapes, dtype


def other_shape(shape):
    """Shapes unequal to `shape`, broadcastable ones among them: (), (1,), one more axis, ..."""
    longer = (*shape[:-1], shape[-1] + 1) if shape else (2,)
    candidates = {(), (1,), (*shape, 1), (1, *shape), longer}
    if len(shape) >= 2:
        candidates.add(tuple(reversed(shape)))
    return st.sampled_from(sorted(candidates - {tuple(shape)}))


def slack(values, dtype, terms):
    """Rounding allowance for a weighted mean of `terms` values bounded by |values|."""
    return 4 * (terms + 1) * np.finfo(dtype).eps * values + 1e-290


def assert_bitwise_equal(actual, expected):
    if expected is None:
        assert actual is None
        return
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape and a.tobytes() == e.tobytes()


def assert_equal_values(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(a, e)


def copies(arrays):
    return None if arrays is None else [np.array(a, copy=True) for a in arrays]


# ---------------------------------------------------------------------------- weighted_mean


@PROPERTY
@given(st.data())
def test_weighted_mean_lies_in_the_hull_of_the_contributing_deltas(data):
    deltas, shapes, dtype = data.draw(client_deltas())
    weights = data.draw(
        st.lists(st.one_of(st.just(0), st.integers(1, 10**6), st.floats(1e-3, 1e6)),
                 min_size=len(deltas), max_size=len(deltas))
    )
    assume(any(w > 0 for w in weights))
    mean = weighted_mean(deltas, weights)
    contributing = [d for d, w in zip(deltas, weights) if w > 0]
    assert len(mean) == len(shapes)
    for index, array in enumerate(mean):
        stack = np.stack([np.asarray(d[index], np.float64) for d in contributing])
        low, high = stack.min(axis=0), stack.max(axis=0)
        allowance = slack(np.maximum(abs(low), abs(high)), dtype, len(contributing))
        assert array.dtype == dtype and array.shape == tuple(shapes[index])
        assert np.isfinite(array).all()
        assert (array >= low - allowance).all() and (array <= high + allowance).all()


@PROPERTY
@given(st.data())
def test_weighted_mean_of_identical_deltas_is_that_delta(data):
    deltas, _, dtype = data.draw(client_deltas(max_clients=1))
    count = data.draw(st.integers(1, 5))
    weights = data.draw(example_counts(count))
    mean = weighted_mean(deltas * count, weights)
    for array, original in zip(mean, deltas[0]):
        allowance = slack(abs(np.asarray(original, np.float64)), dtype, count)
        assert (abs(array.astype(np.float64) - original) <= allowance).all()


@PROPERTY
@given(st.data())
def test_weight_zero_clients_never_affect_the_mean(data):
    deltas, shapes, dtype = data.draw(client_deltas())
    weights = data.draw(example_counts(len(deltas)))
    expected = weighted_mean(deltas, weights)

    # Poison: NaN and Inf everywhere, wrong shapes, the wrong number of arrays.
    def poison():
        kind = data.draw(st.sampled_from(["non-finite", "shape", "count"]))
        if kind == "non-finite":
            return [np.full(s, data.draw(non_finite()), dtype) for s in shapes]
        if kind == "shape":
            return [np.full(data.draw(other_shape(s)), math.nan, dtype) for s in shapes]
        return [np.full(s, math.inf, dtype) for s in shapes] + [np.zeros(2, dtype)]

    mixed_deltas, mixed_weights = list(deltas), list(weights)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(mixed_deltas)))
        mixed_deltas.insert(at, poison())
        mixed_weights.insert(at, data.draw(st.sampled_from([0, 0.0])))
    assert_bitwise_equal(weighted_mean(mixed_deltas, mixed_weights), expected)


@PROPERTY
@given(st.data())
def test_weighted_mean_is_permutation_invariant(data):
    deltas, _, dtype = data.draw(client_deltas(min_clients=2))
    weights = data.draw(example_counts(len(deltas)))
    order = data.draw(st.permutations(range(len(deltas))))
    mean = weighted_mean(deltas, weights)
    permuted = weighted_mean([deltas[i] for i in order], [weights[i] for i in order])
    for index, (a, b) in enumerate(zip(mean, permuted)):
        scale = np.max([abs(np.asarray(d[index], np.float64)) for d in deltas], axis=0)
        assert a.dtype == b.dtype == dtype
        assert (abs(a.astype(np.float64) - b) <= 2 * slack(scale, dtype, len(deltas))).all()


@PROPERTY
@given(st.data())
def test_no_weight_means_no_mean(data):
    """All-zero weights, and the empty set of replies, give None whatever the deltas hold."""
    deltas, _, _ = data.draw(client_deltas(min_clients=0, bound=math.inf))
    for delta in deltas:
        delta[0] = np.full_like(delta[0], data.draw(non_finite()))
    assert weighted_mean(deltas, [0] * len(deltas)) is None
    assert weighted_mean([], []) is None


@PROPERTY
@given(st.data())
def test_weighted_mean_rejects_bad_weights(data):
    deltas, _, _ = data.draw(client_deltas())
    weights = data.draw(example_counts(len(deltas)))
    at = data.draw(st.integers(0, len(weights) - 1))
    weights[at] = data.draw(
        st.one_of(non_finite(), st.floats(max_value=-1e-300), st.integers(-(2**63), -1))
    )
    with pytest.raises(ValueError):
        weighted_mean(deltas, weights)
    extra = data.draw(st.integers(1, 2))
    with pytest.raises(ValueError, match="weights"):
        weighted_mean(deltas, [1] * (len(deltas) + extra))
    with pytest.raises(ValueError, match="weights"):
        weighted_mean(deltas + [deltas[0]] * extra, [1] * len(deltas))


@PROPERTY
@given(st.data())
def test_weighted_mean_rejects_mismatched_arrays(data):
    deltas, shapes, dtype = data.draw(client_deltas(min_clients=2))
    weights = data.draw(example_counts(len(deltas)))
    victim = data.draw(st.integers(0, len(deltas) - 1))
    tensor = data.draw(st.integers(0, len(shapes) - 1))
    bad = list(deltas)
    if data.draw(st.booleans()):  # one array of another shape, broadcastable or not
        arrays = list(deltas[victim])
        arrays[tensor] = np.ones(data.draw(other_shape(shapes[tensor])), dtype)
    else:  # one array too many or too few
        fewer = data.draw(st.booleans())
        arrays = deltas[victim][:-1] if fewer else deltas[victim] + [np.ones(1, dtype)]
    bad[victim] = arrays
    with pytest.raises(ValueError):
        weighted_mean(bad, weights)


# ---------------------------------------------------------------------------- server step


@st.composite
def round_inputs(draw, bound=HUGE):
    """(params, deltas, weights, buffer) of one dtype, the deltas shaped like the params."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=3))
    params = [draw(hnp.arrays(dtype, s, elements=finite(dtype, bound))) for s in shapes]
    deltas, _, _ = draw(client_deltas(bound=bound, dtype=dtype, shapes=shapes))
    weights = draw(example_counts(len(deltas)))
    buffer = None
    if draw(st.booleans()):
        buffer = [draw(hnp.arrays(dtype, s, elements=finite(dtype, bound))) for s in shapes]
    return params, deltas, weights, buffer


@PROPERTY
@given(round_inputs())
def test_plain_fedavg_step_adds_the_mean_delta(inputs):
    params, deltas, weights, buffer = inputs
    before = copies(params), copies(buffer)
    outcome = aggregate_round(params, deltas, weights, buffer, lr=1.0, momentum=0.0)
    mean = weighted_mean(deltas, weights)
    assert not outcome.skipped
    # Equal values (0.0 and -0.0 alike: a zero buffer may come out as either).
    assert_equal_values(outcome.params, [p + m.astype(p.dtype) for p, m in zip(params, mean)])
    assert_equal_values(outcome.momentum_buffer, [-m.astype(p.dtype) for p, m in zip(params, mean)])
    assert_bitwise_equal(params, before[0])  # pure: the arguments are untouched
    assert_bitwise_equal(buffer, before[1])


@PROPERTY
@given(round_inputs(bound=1e6), st.floats(1e-3, 10), st.floats(0, 0.99))
def test_server_step_is_sgd_with_momentum(inputs, lr, momentum):
    params, deltas, weights, buffer = inputs
    outcome = aggregate_round(params, deltas, weights, buffer, lr, momentum)
    mean = weighted_mean(deltas, weights)
    for index, param in enumerate(params):
        gradient = -mean[index].astype(np.float64)
        expected_buffer = gradient if buffer is None else momentum * buffer[index] + gradient
        tolerance = dict(rtol=1e-5, atol=1e-5 * (1 + np.abs(expected_buffer).max()))
        np.testing.assert_allclose(outcome.momentum_buffer[index], expected_buffer, **tolerance)
        np.testing.assert_allclose(outcome.params[index], param - lr * expected_buffer,
                                   rtol=1e-5, atol=1e-5 * (1 + lr * np.abs(expected_buffer).max()))
        assert outcome.params[index].dtype == outcome.momentum_buffer[index].dtype == param.dtype


@overflow_ok
@PROPERTY
@given(round_inputs(), st.data())
def test_non_finite_mean_delta_skips_with_state_bitwise_unchanged(inputs, data):
    params, deltas, weights, buffer = inputs
    before = copies(params), copies(buffer)
    client = data.draw(st.integers(0, len(deltas) - 1))
    tensor = data.draw(st.integers(0, len(params) - 1))
    poisoned = [list(d) for d in deltas]
    array = np.array(poisoned[client][tensor], copy=True)
    # A mean of float32 deltas cannot overflow (the sums run in float64); one of float64 can.
    overflow = ["overflow"] if array.dtype == np.float64 else []
    how = data.draw(st.sampled_from(["nan", "inf", *overflow]))
    if how == "overflow":  # finite deltas whose weighted sum leaves the float range
        biggest = np.finfo(array.dtype).max
        for delta in poisoned:
            delta[tensor] = np.full_like(delta[tensor], biggest)
        weights = [max(w, 2) for w in weights]
    else:
        flat = array.reshape(-1)
        flat[data.draw(st.integers(0, flat.size - 1))] = math.nan if how == "nan" else data.draw(
            st.sampled_from([math.inf, -math.inf]))
        poisoned[client][tensor] = flat.reshape(array.shape)
    outcome = aggregate_round(params, poisoned, weights, buffer, lr=data.draw(st.floats(0.1, 2)),
                              momentum=data.draw(st.floats(0, 0.99)))
    assert outcome.skipped
    assert_bitwise_equal(outcome.params, before[0])
    assert_bitwise_equal(outcome.momentum_buffer, before[1])
    assert_bitwise_equal(params, before[0])
    assert_bitwise_equal(buffer, before[1])


@overflow_ok
@PROPERTY
@given(
    round_inputs(bound=float(np.finfo(np.float32).max)),
    st.floats(0.1, 10),
    st.floats(0, 0.99),
)
@example(  # finite mean delta, but params + delta overflows float32
    ([np.full(2, 3e38, np.float32)], [[np.full(2, 3e38, np.float32)]], [1], None), 1.0, 0.0
)
@example(  # finite mean delta, but momentum * buffer - mean overflows float64
    ([np.zeros(1)], [[np.full(1, -1.7e308)]], [1], [np.full(1, 1.7e308)]), 1.0, 0.9
)
def test_huge_values_either_give_finite_state_or_skip(inputs, lr, momentum):
    params, deltas, weights, buffer = inputs
    before = copies(params), copies(buffer)
    outcome = aggregate_round(params, deltas, weights, buffer, lr, momentum)
    if outcome.skipped:
        assert_bitwise_equal(outcome.params, before[0])
        assert_bitwise_equal(outcome.momentum_buffer, before[1])
    else:
        assert all(np.isfinite(p).all() for p in outcome.params)
        assert all(np.isfinite(b).all() for b in outcome.momentum_buffer)


@PROPERTY
@given(st.data())
def test_server_step_never_broadcasts(data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    shapes = data.draw(st.lists(SHAPES, min_size=1, max_size=3))
    params = [np.ones(s, dtype) for s in shapes]
    tensor = data.draw(st.integers(0, len(shapes) - 1))
    wrong = [np.ones(s, dtype) for s in shapes]
    wrong[tensor] = np.ones(data.draw(other_shape(shapes[tensor])), dtype)
    right = [np.ones(s, dtype) for s in shapes]
    with pytest.raises(ValueError):
        server_sgd_step(params, wrong, None, 1.0, 0.0)
    with pytest.raises(ValueError):
        server_sgd_step(params, right, wrong, 1.0, 0.9)
    with pytest.raises(ValueError):
        server_sgd_step(params, right[:-1] if len(right) > 1 else right + right, None, 1.0, 0.0)
    # Every client agrees with the others but not with the model.
    with pytest.raises(ValueError):
        aggregate_round(params, [wrong, [w.copy() for w in wrong]], [1, 2], None, 1.0, 0.0)


# ---------------------------------------------------------------------------- BayesADMM

F32_MAX = float(np.finfo(np.float32).max)


def positive_precisions():
    """Anything a float32 reply can carry that is positive and finite."""
    return st.one_of(st.sampled_from([1e-45, 1.0, F32_MAX]), st.floats(1e-45, F32_MAX))


def any_float():
    adversarial = [0.0, math.nan, math.inf, -math.inf, 1e308, -1e308]
    return st.one_of(st.sampled_from(adversarial), st.floats())


@st.composite
def admm_inputs(draw, dual=any_float()):
    size = draw(st.integers(1, 6))
    replies = draw(st.integers(1, 4))
    vector = lambda elements: draw(hnp.arrays(np.float64, size, elements=elements))  # noqa: E731
    means = [vector(finite(np.float64, F32_MAX)) for _ in range(replies)]
    precisions = [vector(positive_precisions()) for _ in range(replies)]
    prior = draw(st.one_of(
        st.floats(1e-6, 1e6), hnp.arrays(np.float64, size, elements=st.floats(1e-6, 1e6))
    ))
    return dict(
        client_means=means,
        client_precisions=precisions,
        dual_mean_sum=vector(dual),
        dual_precision_sum=vector(dual),
        rho=draw(st.floats(1e-4, 1e4)),
        prior_precision=prior,
        num_clients=replies + draw(st.integers(0, 5)),
    )


def closed_form(client_means, client_precisions, dual_mean_sum, dual_precision_sum, rho,
                prior_precision, num_clients):
    """Spec section 4 written out, with the average of the replies as the fallback."""
    with np.errstate(all="ignore"):
        alpha = 1.0 / (1.0 + num_clients * rho)
        count = len(client_means)
        precision_sum, natural_sum = 0.0, 0.0  # summed in reply order, as the spec's sum runs
        for m, p in zip(client_means, client_precisions):
            precision_sum, natural_sum = precision_sum + p, natural_sum + p * m
        average_precision, average_natural = precision_sum / count, natural_sum / count
        precision = (1 - alpha) * average_precision + alpha * (prior_precision - dual_precision_sum)
        mean = ((1 - alpha) * average_natural - alpha * dual_mean_sum) / precision
        usable = np.isfinite(precision) & (precision > 0) & np.isfinite(mean)
    return mean, precision, usable, average_natural / average_precision, average_precision


@overflow_ok
@PROPERTY
@given(admm_inputs())
def test_server_update_is_always_a_valid_gaussian(inputs):
    update = server_update(**inputs)
    mean, precision, usable, fallback_mean, fallback_precision = closed_form(**inputs)
    event("every coordinate closed-form" if usable.all() else "some coordinates fall back")
    assert np.isfinite(update.precision).all() and (update.precision > 0).all()
    assert np.isfinite(update.mean).all()
    assert update.fallback_coords == int((~usable).sum())
    np.testing.assert_allclose(update.precision[usable], precision[usable], rtol=1e-12)
    np.testing.assert_allclose(update.mean[usable], mean[usable], rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(update.precision[~usable], fallback_precision[~usable], rtol=1e-12)
    np.testing.assert_allclose(update.mean[~usable], fallback_mean[~usable], rtol=1e-9, atol=1e-300)
    # The same arithmetic on torch tensors gives the same Gaussian.
    as_torch = {
        k: [torch.from_numpy(v) for v in value] if isinstance(value, list)
        else torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        for k, value in inputs.items()
    }
    twin = server_update(**as_torch)
    np.testing.assert_allclose(twin.mean.numpy(), update.mean, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(twin.precision.numpy(), update.precision, rtol=1e-12)
    assert twin.fallback_coords == update.fallback_coords


@PROPERTY
@given(admm_inputs(dual=finite(np.float64, 1e3)))
def test_server_update_is_the_closed_form_where_it_is_positive(inputs):
    """Moderate duals: most coordinates take the closed form, some still fall back."""
    update = server_update(**inputs)
    mean, precision, usable, _, _ = closed_form(**inputs)
    event("every coordinate closed-form" if usable.all() else "some coordinates fall back")
    np.testing.assert_allclose(update.precision[usable], precision[usable], rtol=1e-12)
    np.testing.assert_allclose(update.mean[usable], mean[usable], rtol=1e-9, atol=1e-300)
    assert update.fallback_coords == int((~usable).sum())


@PROPERTY
@given(
    hnp.arrays(np.float64, st.integers(1, 6), elements=st.floats(1e-3, 1e3)),
    st.data(),
)
def test_server_update_keeps_the_fixed_point(precision, data):
    """All replies at (m, S) with sum V = delta - S and sum v = -S m: the global stays (m, S)."""
    size = precision.size
    mean = data.draw(hnp.arrays(np.float64, size, elements=finite(np.float64, 1e3)))
    replies = data.draw(st.integers(1, 4))
    prior = data.draw(st.floats(1e-3, 1e3))
    update = server_update(
        [mean.copy() for _ in range(replies)], [precision.copy() for _ in range(replies)],
        -precision * mean, prior - precision, data.draw(st.floats(1e-3, 1e3)), prior,
        replies + data.draw(st.integers(0, 5)),
    )
    np.testing.assert_allclose(update.precision, precision, rtol=1e-8)
    np.testing.assert_allclose(update.mean, mean, rtol=1e-8, atol=1e-9)
    assert update.fallback_coords == 0


@PROPERTY
@given(admm_inputs(), st.data())
def test_server_update_rejects_bad_reply_sets(inputs, data):
    with pytest.raises(ValueError):
        server_update(**{**inputs, "client_means": [], "client_precisions": []})
    with pytest.raises(ValueError):  # one precision too few or too many
        extra = inputs["client_precisions"][:-1] or inputs["client_precisions"] * 2
        server_update(**{**inputs, "client_precisions": extra})
    with pytest.raises(ValueError):
        server_update(**{**inputs, "num_clients": len(inputs["client_means"]) - 1})
    # One vector of another length, length 1 (which NumPy would broadcast) included.
    size = inputs["client_means"][0].size
    wrong = np.ones(data.draw(st.sampled_from([n for n in (1, 2, size + 1) if n != size])))
    field = data.draw(st.sampled_from(
        ["client_means", "client_precisions", "dual_mean_sum", "dual_precision_sum",
         "prior_precision"]
    ))
    bad = dict(inputs)
    if field.startswith("client"):
        vectors = list(inputs[field])
        vectors[data.draw(st.integers(0, len(vectors) - 1))] = wrong
        bad[field] = vectors
    else:
        bad[field] = wrong
    with pytest.raises(ValueError):
        server_update(**bad)


@PROPERTY
@given(st.data())
def test_client_dual_increment_is_antisymmetric_and_linear_in_the_step(data):
    size = data.draw(st.integers(1, 6))
    def gaussian():
        return (
            data.draw(hnp.arrays(np.float64, size, elements=finite(np.float64, F32_MAX))),
            data.draw(hnp.arrays(np.float64, size, elements=positive_precisions())),
        )

    global_, client = gaussian(), gaussian()
    rho, damping = data.draw(st.floats(1e-4, 1e4)), data.draw(st.floats(1e-4, 1.0))

    for dual in client_dual_increment(*global_, *global_, rho, damping):
        assert (dual == 0).all()
    forward = client_dual_increment(*global_, *client, rho, damping)
    backward = client_dual_increment(*client, *global_, rho, damping)
    assert_equal_values(list(forward), [-b for b in backward])
    # Only the product damping * rho matters, and the increment scales with it.
    assert_bitwise_equal(client_dual_increment(*global_, *client, 2 * rho, damping / 2), forward)
    unit = client_dual_increment(*global_, *client, 1.0, 1.0)
    for a, u in zip(forward, unit):
        np.testing.assert_allclose(a, damping * rho * u, rtol=1e-14, atol=0)
    tensors = [torch.from_numpy(v) for v in (*global_, *client)]
    as_torch = client_dual_increment(*tensors, rho, damping)
    for a, t in zip(forward, as_torch):
        assert isinstance(t, torch.Tensor)
        np.testing.assert_array_equal(t.numpy(), a)


@PROPERTY
@given(st.data())
def test_accumulate_duals_adds_exactly_the_accepted_increments(data):
    size = data.draw(st.integers(1, 6))
    def vector():
        return data.draw(hnp.arrays(np.float64, size, elements=finite(np.float64, 1e30)))

    start = DualSums(vector(), vector())
    increments = [(vector(), vector()) for _ in range(data.draw(st.integers(0, 4)))]
    sums = accumulate_duals(start, increments)
    expected_mean, expected_precision = start.mean, start.precision
    for dv, dV in increments:
        expected_mean, expected_precision = expected_mean + dv, expected_precision + dV
    assert_bitwise_equal([sums.mean, sums.precision], [expected_mean, expected_precision])
    zeros = DualSums.zeros_like(start.mean)
    assert (zeros.mean == 0).all() and (zeros.precision == 0).all() and zeros.mean.shape == (size,)


@PROPERTY
@given(st.floats(1e-6, 10), st.integers(1, 500))
def test_cosine_lr_decays_from_lr0_within_zero_and_lr0(lr0, rounds):
    schedule = [cosine_lr(lr0, r, rounds) for r in range(rounds)]
    assert schedule[0] == lr0
    assert all(0 <= lr <= lr0 for lr in schedule)
    assert all(later <= earlier for earlier, later in zip(schedule, schedule[1:]))


# ---------------------------------------------------------------------------- strategies

MODEL = {"w": (3, 2), "b": (2,)}
INVALID = [
    "nan", "inf", "shape", "keys", "missing-record", "missing-count", "int-dtype",
    "float-dtype", "count", "error", "undecodable",
]


def make_strategy(name, min_train_nodes, server_lr=1.0, server_momentum=0.0, initial=None):
    overrides = {"strategy": name, "min-train-nodes": min_train_nodes}
    if name == "bayes-admm":
        # The reply bounds off: these properties are about validity; the bounds have their own
        # tests (tests/test_robust_aggregation.py, tests/test_bayes_admm_federation.py).
        overrides |= {"optimizer": "ivon", "mean-shift-bound": 0.0, "precision-max": 3e38}
    else:
        overrides.update({"server-lr": server_lr, "server-momentum": server_momentum})
    cfg = parse_run_config(overrides)
    initial = initial or {k: np.zeros(s, np.float32) for k, s in MODEL.items()}
    record = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in initial.items()})
    return STRATEGIES[name](cfg, record), record


def state_of(strategy):
    """Everything a round may change (the checkpointed state, and the fallback count), copied."""
    arrays, meta = strategy.state_dict()
    state = {k: np.array(v, copy=True) for k, v in arrays.items()}
    state.update(meta=meta, fallback_coords=getattr(strategy, "fallback_coords", None))
    if isinstance(strategy, BayesADMM):
        state["accepted_round"] = dict(strategy.accepted_round)
    else:
        state["params"] = copies(strategy.params)
        state["buffer"] = copies(strategy.momentum_buffer)
    return state


def assert_same_state(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert_bitwise_equal([actual[key]], [value])
        elif isinstance(value, list) or value is None:
            assert_bitwise_equal(actual[key], value)
        else:
            assert actual[key] == value, key


@st.composite
def valid_content(draw, name):
    """A reply a correct client could send: model keys, shapes and dtype, finite, positive count."""
    values = finite(np.float32, 1e3)
    content = {
        records.ARRAYS: {
            k: draw(hnp.arrays(np.float32, s, elements=values)) for k, s in MODEL.items()
        },
        records.METRICS: {
            records.NUM_EXAMPLES: draw(st.integers(1, 10**6)), "loss": draw(st.floats(0, 10))
        },
    }
    if name == "bayes-admm":
        precisions = st.floats(2.0**-10, 2.0**10, width=32)
        content[records.PRECISION] = {
            k: draw(hnp.arrays(np.float32, s, elements=precisions)) for k, s in MODEL.items()
        }
    return content


@st.composite
def invalid_content(draw, name, kind):
    """A valid reply with exactly one thing wrong, of the given kind."""
    content = draw(valid_content(name))
    array_records = [records.ARRAYS] + ([records.PRECISION] if name == "bayes-admm" else [])
    if kind == "precision":
        record = content[records.PRECISION]
    else:
        record = content[draw(st.sampled_from(array_records))]
    key = draw(st.sampled_from(sorted(MODEL)))
    if kind in ("nan", "inf", "precision"):
        flat = record[key].reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = {
            "nan": math.nan, "inf": draw(st.sampled_from([math.inf, -math.inf])),
            "precision": draw(st.sampled_from([0.0, -0.0, -1.0, -1e-30])),
        }[kind]
    elif kind == "shape":
        record[key] = np.ones(draw(other_shape(MODEL[key])), np.float32)
    elif kind == "keys":
        change = draw(st.sampled_from(["drop", "add", "rename"]))
        array = record.pop(key) if change != "add" else np.ones(1, np.float32)
        if change != "drop":
            record["extra" if change == "add" else key.upper()] = array
    elif kind == "missing-record":
        del content[draw(st.sampled_from(array_records + [records.METRICS]))]
    elif kind == "missing-count":
        del content[records.METRICS][records.NUM_EXAMPLES]
    elif kind == "int-dtype":
        integer = draw(st.sampled_from([np.int32, np.int64, np.uint8, np.bool_]))
        record[key] = record[key].astype(integer)
    elif kind == "float-dtype":
        record[key] = record[key].astype(draw(st.sampled_from([np.float16, np.float64])))
    elif kind == "undecodable":
        record[key] = draw(undecodable_array(record[key]))
    elif kind == "count":
        content[records.METRICS][records.NUM_EXAMPLES] = draw(
            st.sampled_from([0, -1, -(10**6), 0.0, 10.0, 2.5, -3.0])
        )
    return content


@st.composite
def undecodable_array(draw, array):
    """An Array with the right dtype and shape fields whose bytes are no .npy file of them."""
    data = Array(array).data
    buffer = io.BytesIO()
    np.save(buffer, np.array([None] * array.size, dtype=object), allow_pickle=True)
    data = draw(st.sampled_from([
        b"",
        draw(st.binary(min_size=1, max_size=64)),  # not .npy at all
        data[: draw(st.integers(0, len(data) - 1))],  # cut short
        data[:8] + b"\xff\xff" + data[10:],  # a header length past the end
        buffer.getvalue(),  # pickled objects, which must never be loaded
    ]))
    return Array(dtype=str(array.dtype), shape=array.shape, stype="numpy.ndarray", data=data)


def to_records(content) -> RecordDict:
    out = {}
    for name, value in content.items():
        if name == records.METRICS:
            out[name] = MetricRecord(value)
        else:
            out[name] = ArrayRecord({
                k: v if isinstance(v, Array) else Array(np.ascontiguousarray(v))
                for k, v in value.items()
            })
    return RecordDict(out)


@st.composite
def replies_to(draw, name, instructions, kinds):
    """Replies to some of `instructions` (the others are lost), shuffled; and which are valid."""
    replies, valid = [], []
    for instruction in instructions:
        kind = draw(st.sampled_from(kinds))
        if kind == "lost":
            continue
        if kind == "error":
            message = Message(Error(code=1, reason="client crashed"), reply_to=instruction)
        elif kind == "valid":
            message = reply(instruction, to_records(draw(valid_content(name))))
        else:
            message = reply(instruction, to_records(draw(invalid_content(name, kind))))
        replies.append((message, kind))
    order = draw(st.permutations(range(len(replies))))
    replies = [replies[i] for i in order]
    return [m for m, _ in replies], [m for m, k in replies if k == "valid"], [k for _, k in replies]


def play_round(strategy, server_round, arrays, grid, draw, name, kinds):
    instructions = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    return draw(replies_to(name, instructions, kinds))


@STRATEGY_PROPERTY
@given(st.sampled_from(sorted(STRATEGIES)), st.data())
def test_strategy_uses_exactly_the_valid_replies(name, data):
    num_nodes = data.draw(st.integers(1, 6), label="nodes")
    min_train_nodes = data.draw(st.integers(1, num_nodes), label="min-train-nodes")
    lr, momentum = data.draw(st.sampled_from([(1.0, 0.0), (0.5, 0.9)]))
    initial = {
        k: data.draw(hnp.arrays(np.float32, s, elements=finite(np.float32, 1e3)))
        for k, s in MODEL.items()
    }
    grid = FakeGrid(range(100, 100 + num_nodes))
    strategy, record = make_strategy(name, min_train_nodes, lr, momentum, initial)
    twin, _ = make_strategy(name, min_train_nodes, lr, momentum, initial)
    kinds = ["valid"] * 3 + INVALID + ["lost"] + (["precision"] * 2 if name == "bayes-admm" else [])

    # An optional first round of valid replies, so that momentum and duals are not zero.
    if data.draw(st.booleans(), label="warm-up round"):
        replies, _, _ = play_round(strategy, 1, record, grid, data.draw, name, ["valid"])
        list(twin.configure_train(1, record, ConfigRecord(), grid))
        returned, _ = strategy.aggregate_train(1, replies)
        twin.aggregate_train(1, replies)
        record = returned or record
        server_round = 2
    else:
        server_round = 1

    replies, valid, reply_kinds = play_round(
        strategy, server_round, record, grid, data.draw, name, kinds
    )
    list(twin.configure_train(server_round, record, ConfigRecord(), grid))
    before = state_of(strategy)
    arrays, metrics = strategy.aggregate_train(server_round, iter(replies))

    log = strategy.last_round
    assert log.accepted == len(valid)
    assert log.failed == reply_kinds.count("error")
    assert log.rejected == len(replies) - len(valid) - log.failed
    assert len(log.reasons) == log.rejected + log.failed + int(log.skipped)
    event("skipped" if len(valid) < min_train_nodes else "aggregated")
    for kind in set(reply_kinds):
        event(f"a reply of kind {kind}")
    if len(valid) < min_train_nodes:
        assert (arrays, metrics) == (None, None) and log.skipped
        assert_same_state(state_of(strategy), before)
        return
    assert not log.skipped and arrays is not None
    assert metrics[records.NUM_EXAMPLES] == sum(
        m.content.metric_records[records.METRICS][records.NUM_EXAMPLES] for m in valid
    )
    # The same state as a strategy that never saw an invalid reply.
    twin.aggregate_train(server_round, valid)
    assert_same_state(state_of(strategy), state_of(twin))
    assert twin.last_round.rejected == twin.last_round.failed == 0

    received = [record_to_numpy(m.content.array_records[records.ARRAYS]) for m in valid]
    if name == "bayes-admm":
        assert strategy.accepted_round == {
            **before["accepted_round"], **{m.metadata.src_node_id: server_round for m in valid}
        }
        assert np.isfinite(strategy.mean).all() and (strategy.precision > 0).all()
        precisions = [
            flatten(record_to_numpy(m.content.array_records[records.PRECISION])) for m in valid
        ]
        at_prior = before["meta"]["at_prior"]
        global_mean = np.zeros_like(before["mean"]) if at_prior else before["mean"]
        increments = [
            client_dual_increment(global_mean, before["precision"], flatten(r).astype(np.float64),
                                  p.astype(np.float64), strategy.cfg.admm_rho, strategy.cfg.dual_damping)
            for r, p in zip(received, precisions)
        ]
        start = DualSums(before["dual-mean"], before["dual-precision"])
        duals = accumulate_duals(start, increments)
        assert_bitwise_equal(
            [strategy.duals.mean, strategy.duals.precision], [duals.mean, duals.precision]
        )
        expected = server_update(
            [flatten(r).astype(np.float64) for r in received],
            [p.astype(np.float64) for p in precisions], duals.mean, duals.precision,
            strategy.cfg.admm_rho, strategy.prior_precision, strategy.num_clients,
        )
        assert_bitwise_equal([strategy.mean, strategy.precision], as_sent(expected))
    else:
        deltas = [
            [r[k] - p if name == "fedavg" else r[k] for k, p in zip(MODEL, before["params"])]
            for r in received
        ]
        weights = [m.content.metric_records[records.METRICS][records.NUM_EXAMPLES] for m in valid]
        expected = aggregate_round(
            before["params"], deltas, weights, before["buffer"], lr, momentum
        )
        assert not expected.skipped
        assert_bitwise_equal(strategy.params, expected.params)
        assert_bitwise_equal(strategy.momentum_buffer, expected.momentum_buffer)
        assert_bitwise_equal([arrays[k].numpy() for k in MODEL], expected.params)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_an_empty_set_of_replies_skips_the_round(name):
    strategy, record = make_strategy(name, 1)
    list(strategy.configure_train(1, record, ConfigRecord(), FakeGrid([1, 2])))
    before = state_of(strategy)
    assert strategy.aggregate_train(1, []) == (None, None)
    assert strategy.last_round.skipped and strategy.last_round.accepted == 0
    assert strategy.last_round.rejected == strategy.last_round.failed == 0
    assert_same_state(state_of(strategy), before)


def as_sent(update):
    """The global as the strategy keeps it: in the model's dtype (float32), the one it sends."""
    with np.errstate(over="ignore"):
        return [v.astype(np.float32).astype(np.float64) for v in (update.mean, update.precision)]


def test_bayes_admm_streaming_aggregation_is_server_update_round_after_round():
    """The strategy folds the replies in one at a time; the pure `server_update` and
    `accumulate_duals` take them as lists. Same mean, precision and duals, bit for bit, over
    rounds with partial participation (K = 5 nodes, 2 to 5 replies a round)."""
    strategy, record = make_strategy("bayes-admm", 1)
    grid, rng, size = FakeGrid(range(1, 6)), np.random.default_rng(3), 8
    shapes = {k: np.zeros(s, np.float32) for k, s in MODEL.items()}
    for server_round in range(1, 5):
        instructions = list(strategy.configure_train(server_round, record, ConfigRecord(), grid))
        answering = rng.choice(len(instructions), size=rng.integers(2, 6), replace=False)
        sent = [(rng.normal(size=size), rng.uniform(0.5, 3.0, size=size)) for _ in answering]
        sent = [(m.astype(np.float32), s.astype(np.float32)) for m, s in sent]
        replies = [
            reply(instructions[i], to_records({
                records.ARRAYS: unflatten(m, shapes), records.PRECISION: unflatten(s, shapes),
                records.METRICS: {records.NUM_EXAMPLES: 10},
            }))
            for i, (m, s) in zip(answering, sent)
        ]
        means = [m.astype(np.float64) for m, _ in sent]
        precisions = [s.astype(np.float64) for _, s in sent]
        received = np.zeros(size) if strategy.at_prior else strategy.mean
        increments = [
            client_dual_increment(received, strategy.precision, m, s, strategy.cfg.admm_rho,
                                  strategy.cfg.dual_damping)
            for m, s in zip(means, precisions)
        ]
        duals = accumulate_duals(strategy.duals, increments)
        expected = server_update(means, precisions, duals.mean, duals.precision, strategy.cfg.admm_rho,
                                 strategy.prior_precision, 5)

        record, _ = strategy.aggregate_train(server_round, replies)
        assert strategy.last_round.accepted == len(replies) and not strategy.last_round.skipped
        assert_bitwise_equal([strategy.duals.mean, strategy.duals.precision],
                             [duals.mean, duals.precision])
        assert_bitwise_equal([strategy.mean, strategy.precision], as_sent(expected))
        assert strategy.fallback_coords == expected.fallback_coords == 0


@overflow_ok
@pytest.mark.parametrize(
    "initial, sent, server_lr",
    [
        (-3e38, 3e38, 1.0),  # each delta overflows float32 on the server
        (3e38, 3.4e38, 2.0),  # the mean is finite, the stepped params are not
    ],
)
def test_fedavg_round_that_would_overflow_is_skipped(initial, sent, server_lr):
    strategy, record = make_strategy(
        "fedavg", 1, server_lr, 0.0, {k: np.full(s, initial, np.float32) for k, s in MODEL.items()}
    )
    instructions = list(strategy.configure_train(1, record, ConfigRecord(), FakeGrid([1, 2])))
    replies = [
        reply(i, to_records({
            records.ARRAYS: {k: np.full(s, sent, np.float32) for k, s in MODEL.items()},
            records.METRICS: {records.NUM_EXAMPLES: 5},
        }))
        for i in instructions
    ]
    before = state_of(strategy)
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert strategy.last_round.accepted == 2 and strategy.last_round.skipped
    assert_same_state(state_of(strategy), before)


# ---------------------------------------------------------------------------- robust aggregation


@PROPERTY
@given(st.data(), st.sampled_from(["trimmed-mean", "median", "krum", "multi-krum"]))
def test_robust_combiners_stay_in_the_coordinatewise_hull(data, aggregation):
    deltas, shapes, dtype = data.draw(client_deltas(min_clients=1, max_clients=6, bound=1e6))
    weights = data.draw(example_counts(len(deltas)))
    combined = robust_combine(aggregation, deltas, weights, 0.25, 1)
    for index, array in enumerate(combined):
        stack = np.stack([np.asarray(d[index], np.float64) for d in deltas])
        allowance = slack(np.abs(stack).max(axis=0), dtype, len(deltas))
        assert array.dtype == dtype and array.shape == tuple(shapes[index])
        assert (array >= stack.min(axis=0) - allowance).all()
        assert (array <= stack.max(axis=0) + allowance).all()


@PROPERTY
@given(st.data())
def test_clipped_updates_keep_their_direction_and_respect_the_norm(data):
    deltas, _, _ = data.draw(client_deltas(max_clients=1, bound=1e6, dtype=np.float64))
    max_norm = data.draw(st.floats(1e-3, 1e3))
    clipped, cut = clip_update(deltas[0], max_norm)
    norm = math.sqrt(sum(float((a**2).sum()) for a in deltas[0]))
    new_norm = math.sqrt(sum(float((a**2).sum()) for a in clipped))
    assert new_norm <= max_norm * (1 + 1e-9) or not cut
    assert cut == (norm > max_norm * (1 + 1e-12)) or math.isclose(norm, max_norm, rel_tol=1e-9)
    if not cut:
        assert_bitwise_equal(clipped, deltas[0])


@PROPERTY
@given(st.data())
def test_bound_reply_always_lands_inside_the_bounds(data):
    size = data.draw(st.integers(1, 6))
    positive = st.floats(1e-30, 3e38)
    vec = lambda elements: data.draw(hnp.arrays(np.float64, size, elements=elements))  # noqa: E731
    client_mean, client_precision = vec(finite(bound=1e30)), vec(positive)
    global_mean, global_precision = vec(finite(bound=1e6)), vec(st.floats(1e-6, 1e12))
    ratio = data.draw(st.sampled_from([0.0, 1.0, 10.0, 1e3]))
    low = data.draw(st.sampled_from([0.0, 1e-8]))
    high = data.draw(st.sampled_from([1e12, math.inf]))
    shift = data.draw(st.sampled_from([0.0, 1.0, 1000.0]))
    bounded = bound_reply(client_mean, client_precision, global_mean, global_precision,
                          ratio, low, high, shift)
    assert np.isfinite(bounded.mean).all() or shift == 0
    assert (bounded.precision >= low).all() and (bounded.precision <= high).all()
    if ratio:
        inside = (global_precision / ratio >= low) & (global_precision * ratio <= high)
        p = bounded.precision[inside]
        assert (p >= global_precision[inside] / ratio).all() and (p <= global_precision[inside] * ratio).all()
    if shift:
        reach = shift / np.sqrt(global_precision)
        rounding = 4 * np.finfo(np.float64).eps * np.abs(global_mean)
        assert (np.abs(bounded.mean - global_mean) <= reach * (1 + 1e-12) + rounding).all()
    changed = (bounded.mean != client_mean) | (bounded.precision != client_precision)
    assert bounded.clipped_coords == int(changed.sum())
    # Idempotent: a clipped reply is inside the bounds.
    again = bound_reply(bounded.mean, bounded.precision, global_mean, global_precision, ratio, low, high, shift)
    assert again.clipped_coords == 0


@PROPERTY
@given(st.data())
def test_multi_krum_keep_never_keeps_f_far_replies(data):
    """n replies, f of them (any f with n >= 2f + 3) more than 1000 sqrt(n) global standard
    deviations from every honest one, honest ones within 1 of a centre, per coordinate: the
    n - f kept are exactly the honest ones (Krum's guarantee: a far reply's n - f - 2 nearest
    include at least two honest ones), whatever the global precision and the far replies'
    places (clustered or not)."""
    size = data.draw(st.integers(1, 5))
    n = data.draw(st.integers(3, 9))
    f = data.draw(st.integers(0, (n - 3) // 2))
    vec = lambda elements: data.draw(hnp.arrays(np.float64, size, elements=elements))  # noqa: E731
    precision = vec(st.floats(1e-4, 1e4))
    centre = vec(st.floats(-10, 10))
    far = data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=f, max_size=f))
    honest = [centre + vec(st.floats(-1, 1)) for _ in range(n - f)]
    hostile = [centre + sign * 1000 * math.sqrt(n) * 2 + vec(st.floats(-1, 1)) for sign in far]
    order = data.draw(st.permutations(range(n)))
    standard = [(honest + hostile)[i] for i in order]  # in global standard deviations
    means = [x / np.sqrt(precision) for x in standard]
    kept = multi_krum_keep(means, precision, f)
    assert kept == sorted(set(kept)) and len(kept) == n - f
    assert kept == [position for position, i in enumerate(order) if i < n - f]


@PROPERTY
@given(st.lists(st.one_of(st.integers(1, 2**63 - 1), st.floats(1e-3, 1e15)), min_size=1, max_size=10),
       st.floats(0.05, 1.0))
def test_capped_weights_give_no_reply_more_than_its_share(weights, cap):
    shares = cap_weights(weights, cap)
    assert math.isclose(sum(shares), 1.0, rel_tol=1e-9) or cap == 1
    if cap < 1 and len(weights) * cap > 1:
        assert max(shares) <= cap * (1 + 1e-12)
