import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from strategies.fedavg import FedAvg, server_sgd_step, weighted_mean
from task import records
from task.config import parse_run_config
from tests.conftest import reply


def test_weighted_mean_matches_hand_computation():
    a = [np.array([1.0, 2.0]), np.array([[3.0]])]
    b = [np.array([4.0, -2.0]), np.array([[0.0]])]
    avg = weighted_mean([a, b], [1, 3])
    np.testing.assert_allclose(avg[0], [(1 + 12) / 4, (2 - 6) / 4])
    np.testing.assert_allclose(avg[1], [[3 / 4]])
    assert weighted_mean([a, b], [0, 0]) is None


def test_server_step_without_momentum_adds_the_mean_delta():
    new, _ = server_sgd_step([np.array([1.0, 1.0])], [np.array([0.5, -1.0])], None, 1.0, 0.0)
    np.testing.assert_allclose(new[0], [1.5, 0.0])


def test_server_momentum_unrolled_by_hand():
    # b1 = -d1; p1 = p0 - lr*b1.  b2 = m*b1 - d2; p2 = p1 - lr*b2.
    lr, m = 0.5, 0.9
    p0, d1, d2 = np.array([2.0]), np.array([1.0]), np.array([-0.5])
    p1, buf = server_sgd_step([p0], [d1], None, lr, m)
    p2, _ = server_sgd_step(p1, [d2], buf, lr, m)
    b1 = -d1
    b2 = m * b1 - d2
    np.testing.assert_allclose(p1[0], p0 - lr * b1)
    np.testing.assert_allclose(p2[0], p0 - lr * b1 - lr * b2)


def _record(w: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"w": Array(w.astype(np.float32))})


def _train_reply(instruction, w, n):
    return reply(
        instruction,
        RecordDict(
            {
                records.ARRAYS: _record(np.asarray(w)),
                records.METRICS: MetricRecord({records.NUM_EXAMPLES: n, "loss": float(n)}),
            }
        ),
    )


def _strategy(**overrides):
    cfg = parse_run_config({"min-train-nodes": 2, **overrides})
    return FedAvg(cfg, _record(np.zeros(2)))


def test_strategy_round_is_the_example_weighted_mean(fake_grid):
    strategy = _strategy()
    msgs = list(strategy.configure_train(1, _record(np.zeros(2)), ConfigRecord(), fake_grid([7, 8, 9])))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [7, 8, 9]
    assert all(m.content[records.CONFIG][records.SERVER_ROUND] == 1 for m in msgs)
    replies = [
        _train_reply(msgs[0], [1.0, 0.0], 10),
        _train_reply(msgs[1], [0.0, 1.0], 30),
        _train_reply(msgs[2], [2.0, 2.0], 60),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [(10 + 120) / 100, (30 + 120) / 100], rtol=1e-6)
    assert metrics[records.NUM_EXAMPLES] == 100
    assert metrics["loss"] == pytest.approx((100 + 900 + 3600) / 100)


def test_server_momentum_strategy_matches_pure_step(fake_grid):
    strategy = _strategy(**{"server-lr": 0.5, "server-momentum": 0.9})
    params = np.zeros(2)
    buffer = None
    for rnd, target in enumerate(([1.0, 2.0], [0.0, -1.0]), start=1):
        msgs = list(strategy.configure_train(rnd, _record(params), ConfigRecord(), fake_grid([1, 2])))
        arrays, _ = strategy.aggregate_train(rnd, [_train_reply(m, target, 5) for m in msgs])
        expected, buffer = server_sgd_step([params], [np.array(target) - params], buffer, 0.5, 0.9)
        np.testing.assert_allclose(arrays["w"].numpy(), expected[0], rtol=1e-6)
        params = arrays["w"].numpy().astype(np.float64)


@pytest.mark.parametrize(
    "bad",
    [
        {"w": [np.nan, 0.0]},
        {"w": [np.inf, 0.0]},
        {"w": [1.0, 2.0, 3.0]},
        {"n": 0},
        {"n": -3},
    ],
)
def test_bad_reply_is_rejected_and_the_round_goes_on(fake_grid, bad):
    strategy = _strategy()
    msgs = list(strategy.configure_train(1, _record(np.zeros(2)), ConfigRecord(), fake_grid([1, 2, 3])))
    good = [_train_reply(msgs[0], [1.0, 1.0], 10), _train_reply(msgs[1], [3.0, 3.0], 10)]
    poisoned = _train_reply(msgs[2], bad.get("w", [100.0, 100.0]), bad.get("n", 10))
    arrays, _ = strategy.aggregate_train(1, good + [poisoned])
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0])
    assert strategy.last_round.accepted == 2 and strategy.last_round.rejected == 1
    assert not strategy.last_round.skipped
    assert len(strategy.last_round.reasons) == 1 and "node" in strategy.last_round.reasons[0]


def test_too_few_valid_replies_skip_the_round(fake_grid):
    strategy = _strategy(**{"min-train-nodes": 2})
    msgs = list(strategy.configure_train(1, _record(np.ones(2)), ConfigRecord(), fake_grid([1, 2])))
    arrays, metrics = strategy.aggregate_train(
        1, [_train_reply(msgs[0], [5.0, 5.0], 10), _train_reply(msgs[1], [np.nan, 1.0], 10)]
    )
    assert arrays is None and metrics is None
    assert strategy.last_round.skipped
    np.testing.assert_array_equal(strategy.params[0], np.ones(2))


def test_fraction_train_samples_a_seeded_subset(fake_grid):
    nodes = list(range(100, 120))
    picks = []
    for _ in range(2):
        strategy = _strategy(**{"fraction-train": 0.25, "min-train-nodes": 2, "seed": 3})
        msgs = strategy.configure_train(1, _record(np.zeros(2)), ConfigRecord(), fake_grid(nodes))
        picks.append(sorted(m.metadata.dst_node_id for m in msgs))
    assert len(picks[0]) == 5 and picks[0] == picks[1]
    assert set(picks[0]) <= set(nodes)


def test_a_second_reply_from_the_same_node_is_rejected(fake_grid):
    strategy = _strategy()
    msgs = list(strategy.configure_train(1, _record(np.zeros(2)), ConfigRecord(), fake_grid([1, 2])))
    first, again = _train_reply(msgs[0], [1.0, 1.0], 10), _train_reply(msgs[0], [9.0, 9.0], 10)
    arrays, _ = strategy.aggregate_train(1, [first, _train_reply(msgs[1], [3.0, 3.0], 10), again])
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 2.0])
    assert strategy.last_round.rejected == 1
    assert "second reply" in strategy.last_round.reasons[0]


def test_round_messages_expire_when_the_round_stops_waiting(fake_grid):
    # A node that comes back after a round must not pull and train on that round's message.
    strategy = _strategy(**{"round-timeout": 42.0, "fraction-evaluate": 1.0})
    train = strategy.configure_train(1, _record(np.zeros(2)), ConfigRecord(), fake_grid([1, 2]))
    evaluate = strategy.configure_evaluate(1, _record(np.zeros(2)), ConfigRecord(), fake_grid([1, 2]))
    assert [m.metadata.ttl for m in [*train, *evaluate]] == [42.0] * 4
