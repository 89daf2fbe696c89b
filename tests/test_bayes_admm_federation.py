"""BayesADMM with real IVON clients in one process: dual bookkeeping under partial participation
and lost replies, lasting client state, the posterior artifact and prediction from it."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from benchmarks.inprocess import InProcessGrid, default_run_config, simulate
from client_app.bayes_admm import committed_duals
from client_app.state import ClientState
from strategies import STRATEGIES
from strategies.bayes_admm import BayesADMM
from task import records
from task.config import parse_run_config
from task.data import data_spec
from task.models import build_model
from task.params import model_to_record
from task.predict import load_global_model, main as predict_main, predict
from tests.conftest import reply

SMALL = {
    "strategy": "bayes-admm",
    "optimizer": "ivon",
    "model": "logreg",
    "local-epochs": 1,
    "lr": 0.05,
    "rho": 0.5,
    "dual-damping": 0.5,
    "fraction-evaluate": 0.0,
    "eval-mc-samples": 2,
}


def _node_duals(grid: InProcessGrid, strategy: BayesADMM, node: int):
    """The duals node `node` holds once it commits whatever the server accepted."""
    saved = ClientState(grid.contexts[node]).load()
    return committed_duals(saved, strategy.accepted_round.get(node, 0), strategy.mean.size)


@pytest.mark.parametrize("posterior", ["diagonal", "isotropic"])
def test_server_dual_sums_match_what_clients_hold(posterior):
    overrides = {**SMALL, "fraction-train": 0.5, "min-train-nodes": 2, "num-server-rounds": 6,
                 "posterior": posterior}
    if posterior == "isotropic":
        overrides["optimizer"] = "sgd"
    run_config = {**default_run_config(), **overrides}
    cfg = parse_run_config(run_config)
    grid = InProcessGrid(run_config, num_nodes=6)
    strategy = STRATEGIES["bayes-admm"](cfg, model_to_record(build_model(cfg, data_spec(cfg))))
    from benchmarks.inprocess import _set_task_identity

    _set_task_identity()
    lost = 0
    for server_round in range(1, 7):
        messages = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        assert len(messages) == 3  # half of six nodes
        replies = grid.send_and_receive(messages)
        # The last sampled node trained (and saved a pending increment) but its reply is lost.
        dropped = replies[-1].metadata.src_node_id
        strategy.aggregate_train(server_round, replies[:-1])
        lost += 1
        assert strategy.accepted_round.get(dropped, 0) < server_round
        held = [_node_duals(grid, strategy, n) for n in grid.contexts]
        np.testing.assert_allclose(sum(v for v, _ in held), strategy.duals.mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sum(V for _, V in held), strategy.duals.precision, rtol=1e-9, atol=1e-12)
        assert np.isfinite(strategy.mean).all() and (strategy.precision > 0).all()
        if posterior == "isotropic":
            np.testing.assert_array_equal(strategy.precision, 1.0)
    assert lost == 6 and strategy.num_clients == 6
    assert np.abs(strategy.duals.mean).sum() > 0


def test_committed_duals_take_the_pending_increment_only_when_accepted():
    saved = {
        "dual-mean": np.array([1.0]),
        "dual-precision": np.array([2.0]),
        "pending-dual-mean": np.array([0.5]),
        "pending-dual-precision": np.array([-1.0]),
        "pending-round": np.int64(4),
    }
    assert [a.tolist() for a in committed_duals(saved, 4, 1)] == [[1.5], [1.0]]
    assert [a.tolist() for a in committed_duals(saved, 3, 1)] == [[1.0], [2.0]]
    assert [a.tolist() for a in committed_duals({}, 0, 2)] == [[0.0, 0.0], [0.0, 0.0]]


def test_client_keeps_ivon_momentum_and_step_across_rounds():
    run_config = {**default_run_config(), **SMALL, "num-server-rounds": 2}
    cfg = parse_run_config(run_config)
    grid = InProcessGrid(run_config, num_nodes=2)
    strategy = STRATEGIES["bayes-admm"](cfg, model_to_record(build_model(cfg, data_spec(cfg))))
    steps = []
    for server_round in (1, 2):
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        )
        strategy.aggregate_train(server_round, replies)
        saved = ClientState(grid.contexts[1]).load()
        steps.append(int(saved["step"]))
        assert np.abs(saved["momentum"]).sum() > 0
    assert steps[1] == 2 * steps[0] > 0


def test_reply_with_non_positive_precision_is_rejected(fake_grid):
    cfg = parse_run_config({**default_run_config(), **SMALL, "min-train-nodes": 1})
    initial = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    strategy = BayesADMM(cfg, initial)
    msgs = list(strategy.configure_train(1, initial, ConfigRecord(), fake_grid([1, 2])))

    def answer(msg, precision):
        return reply(msg, RecordDict({
            records.ARRAYS: ArrayRecord({"w": Array(np.ones(2, dtype=np.float32))}),
            records.PRECISION: ArrayRecord({"w": Array(np.asarray(precision, dtype=np.float32))}),
            records.METRICS: MetricRecord({records.NUM_EXAMPLES: 10}),
        }))

    strategy.aggregate_train(1, [answer(msgs[0], [2.0, 3.0]), answer(msgs[1], [1.0, -1.0])])
    assert strategy.last_round.accepted == 1 and strategy.last_round.rejected == 1
    assert "precision must be positive" in strategy.last_round.reasons[0]
    assert strategy.accepted_round == {msgs[0].metadata.dst_node_id: 1}


def test_run_saves_posterior_and_bma_metrics_and_predicts(tmp_path, capsys):
    out = tmp_path / "run"
    outputs = simulate({**SMALL, "num-server-rounds": 3, "output-dir": str(out)}, num_nodes=3)
    for entry in outputs.results["rounds"]:
        assert {"bma_accuracy", "bma_nll", "bma_ece"} <= entry.keys()
    model = load_global_model(out)
    assert model.precision is not None and all((p > 0).all() for p in model.precision.values())
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    result = predict(model, x, samples=4)
    np.testing.assert_allclose(result.probs.sum(1), 1.0, rtol=1e-6)
    assert (result.probs_std > 0).any() and (result.entropy > 0).all()

    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=x, y=np.arange(5))
    preds = tmp_path / "preds.npz"
    assert predict_main([str(out), str(inputs), "--samples", "4", "--out", str(preds)]) == 0
    assert "BMA over 4 draws" in capsys.readouterr().out
    with np.load(preds) as npz:
        np.testing.assert_allclose(npz["probs"], result.probs)


def test_predict_reports_a_bad_run_folder(tmp_path, capsys):
    assert predict_main([str(tmp_path), str(tmp_path / "x.npz")]) == 2
    assert "no model.json" in capsys.readouterr().err


def test_a_global_outside_float32_skips_the_round(fake_grid):
    # rho 10: the dual term doubles a mean near float32's largest value (m_g = 5.4e38). The
    # mean-shift bound, on by default, would clip this reply: switched off to reach the guard.
    cfg = parse_run_config({**default_run_config(), **SMALL, "min-train-nodes": 1, "rho": 10.0,
                            "dual-damping": 1.0, "mean-shift-bound": 0.0})
    initial = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    strategy = BayesADMM(cfg, initial)
    msgs = list(strategy.configure_train(1, initial, ConfigRecord(), fake_grid([1])))
    huge = RecordDict({
        records.ARRAYS: ArrayRecord({"w": Array(np.full(2, 3e38, dtype=np.float32))}),
        records.PRECISION: ArrayRecord({"w": Array(np.ones(2, dtype=np.float32))}),
        records.METRICS: MetricRecord({records.NUM_EXAMPLES: 10}),
    })
    before = strategy.state_dict()[0]
    assert strategy.aggregate_train(1, [reply(msgs[0], huge)]) == (None, None)
    assert strategy.last_round.skipped and strategy.at_prior and strategy.accepted_round == {}
    for key, value in strategy.state_dict()[0].items():
        np.testing.assert_array_equal(value, before[key])


@pytest.mark.parametrize("prior_precision", [0.1, 0.01])
def test_server_dual_sums_equal_the_clients_bit_for_bit_after_round_one(prior_precision):
    # float32(0.1) = 0.10000000149: the server must start from the prior the clients receive.
    run_config = {**default_run_config(), **SMALL, "prior-precision": prior_precision}
    cfg = parse_run_config(run_config)
    grid = InProcessGrid(run_config, num_nodes=3)
    strategy = STRATEGIES["bayes-admm"](cfg, model_to_record(build_model(cfg, data_spec(cfg))))
    np.testing.assert_array_equal(strategy.precision, np.float64(np.float32(prior_precision)))
    replies = grid.send_and_receive(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    strategy.aggregate_train(1, replies)
    assert strategy.last_round.accepted == 3
    held = [_node_duals(grid, strategy, node) for node in grid.contexts]
    np.testing.assert_array_equal(sum(v for v, _ in held), strategy.duals.mean)
    np.testing.assert_array_equal(sum(V for _, V in held), strategy.duals.precision)


def test_dual_sums_stay_equal_across_a_resume_that_draws_new_node_ids(tmp_path):
    """A resumed simulation is a new Flower run: new node ids in another order, empty memory;
    the nodes' state comes from <output-dir>/client-state and the accepted rounds by client-id."""
    from benchmarks.inprocess import _set_task_identity

    _set_task_identity()
    run_config = {**default_run_config(), **SMALL, "fraction-train": 0.5, "min-train-nodes": 2}
    cfg = parse_run_config(run_config)
    (tmp_path / "client-state").mkdir()
    config = ConfigRecord({records.STATE_KEY: "k", records.CLIENT_STATE_DIR: str(tmp_path / "client-state")})

    def rounds(strategy, grid, numbers):
        for server_round in numbers:
            replies = grid.send_and_receive(strategy.configure_train(server_round, ArrayRecord(), config, grid))
            assert not any(r.has_error() for r in replies)
            strategy.aggregate_train(server_round, replies[:-1])  # one reply lost every round
            accepted = strategy.accepted_by_client()
            held = []
            for context in grid.contexts.values():
                state = ClientState(context, "k", str(tmp_path / "client-state"))
                held.append(committed_duals(state.load(), accepted.get(state.client_id, 0), strategy.mean.size))
            np.testing.assert_allclose(sum(v for v, _ in held), strategy.duals.mean, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(sum(V for _, V in held), strategy.duals.precision, rtol=1e-9, atol=1e-12)

    initial = model_to_record(build_model(cfg, data_spec(cfg)))
    first = STRATEGIES["bayes-admm"](cfg, initial)
    rounds(first, InProcessGrid(run_config, num_nodes=6), [1, 2, 3])

    resumed = STRATEGIES["bayes-admm"](cfg, initial)
    resumed.load_state_dict(*first.state_dict())
    grid = InProcessGrid(run_config, num_nodes=6)  # fresh contexts
    new_ids = [907, 13, 400, 52, 6001, 88]  # partition p gets new_ids[p]: another sort order
    grid.contexts = {new_ids[node - 1]: context for node, context in grid.contexts.items()}
    for node, context in grid.contexts.items():
        context.node_id, context.run_id = node, 2
    grid.node_ids = sorted(grid.contexts)
    rounds(resumed, grid, [4, 5, 6])
    assert resumed.client_ids and set(resumed.client_ids.values()) <= {f"partition-{p}" for p in range(6)}


def _federation_with_a_hostile_round(overrides, attack_rounds, num_rounds=8, num_nodes=4):
    """`num_nodes` real IVON nodes; the last replies with precision 1e30 and mean 7 (issue 14's
    pinning attack) in `attack_rounds`, and is honest again afterwards. Yields the strategy each
    round, after checking that the server's dual sums equal what the nodes hold."""
    from benchmarks.inprocess import _set_task_identity

    run_config = {**default_run_config(), **SMALL, "min-train-nodes": 3, **overrides}
    cfg = parse_run_config(run_config)
    grid = InProcessGrid(run_config, num_nodes=num_nodes)
    strategy = STRATEGIES["bayes-admm"](cfg, model_to_record(build_model(cfg, data_spec(cfg))))
    _set_task_identity()
    for server_round in range(1, num_rounds + 1):
        messages = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
        replies = grid.send_and_receive(messages)
        if server_round in attack_rounds:
            honest = replies[-1].content
            hostile = RecordDict({
                records.ARRAYS: ArrayRecord({k: Array(np.full(a.shape, 7.0, np.float32))
                                             for k, a in honest.array_records[records.ARRAYS].items()}),
                records.PRECISION: ArrayRecord({k: Array(np.full(a.shape, 1e30, np.float32))
                                                for k, a in honest.array_records[records.PRECISION].items()}),
                records.METRICS: honest.metric_records[records.METRICS],
            })
            replies[-1] = reply(messages[-1], hostile)
        _, metrics = strategy.aggregate_train(server_round, replies)
        held = [_node_duals(grid, strategy, n) for n in grid.contexts]
        np.testing.assert_allclose(sum(V for _, V in held), strategy.duals.precision, rtol=1e-9, atol=1e-9)
        yield strategy, metrics


def test_a_pinning_reply_is_clipped_and_honest_rounds_pull_the_global_back():
    """Against an honest twin run: the pinning reply's out-of-bounds coordinates are left out of
    the average, so the attack round moves the global little (measured: relative distance of
    the mean 0.19, median precision ratio 1.0; when the clipped reply still entered the average,
    9.9 and 3.1), and the distance shrinks after it (0.19 -> 0.029 over 8 rounds, then level at
    the run-to-run noise). c = 10 also clips every honest reply of round 1, where the global is
    the prior (the twin too); later honest rounds are never clipped."""
    # The IVON settings this was measured with (the defaults before issue 13): at the new
    # defaults' temperature 1e-3 honest replies move the precision by more than c = 10 a round.
    bound = {"precision-ratio-bound": 10.0, "temperature": 1.0, "hess-init": 0.1,
             "dual-damping": 0.1, "beta2": 0.9998}
    honest = [(s.mean.copy(), s.precision.copy()) for s, _ in
              _federation_with_a_hostile_round(bound, (), 10)]
    distances, ratios = [], []
    for server_round, (strategy, metrics) in enumerate(
        _federation_with_a_hostile_round(bound, (2,), 10), start=1
    ):
        mean, precision = honest[server_round - 1]
        distances.append(np.linalg.norm(strategy.mean - mean) / np.linalg.norm(mean))
        ratios.append(np.median(strategy.precision / precision))
        if server_round == 2:
            assert metrics["clipped-replies"] == 1 and metrics["clipped-coords"] > 0
            assert any("node 4:" in r and "dual increment not accepted" in r
                       for r in strategy.last_round.reasons)
            assert strategy.accepted_round.get(4, 0) < 2
            assert np.all(strategy.precision <= 10 * precision) and np.isfinite(strategy.mean).all()
        elif server_round > 2:
            assert metrics["clipped-replies"] == 0
    assert distances[1] < 0.5 and abs(ratios[1] - 1) < 0.01
    assert all(later < 1.01 * earlier for earlier, later in zip(distances[1:], distances[2:]))
    assert distances[-1] < 0.25 * distances[1]
    assert all(abs(ratio - 1) < 0.01 for ratio in ratios)


def _multi_krum_round(fake_grid, overrides, means, precisions):
    """One round of a BayesADMM server over len(means) nodes whose replies are (means[k],
    precisions[k]) on a 3-vector; returns the strategy and the round's metrics."""
    cfg = parse_run_config({**default_run_config(), **SMALL, "min-train-nodes": len(means),
                            **overrides})
    initial = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    strategy = BayesADMM(cfg, initial)
    msgs = list(strategy.configure_train(1, initial, ConfigRecord(),
                                         fake_grid(list(range(1, len(means) + 1)))))
    replies = [reply(msg, RecordDict({
        records.ARRAYS: ArrayRecord({"w": Array(np.asarray(m, dtype=np.float32))}),
        records.PRECISION: ArrayRecord({"w": Array(np.asarray(s, dtype=np.float32))}),
        records.METRICS: MetricRecord({records.NUM_EXAMPLES: 10}),
    })) for msg, m, s in zip(msgs, means, precisions)]
    _, metrics = strategy.aggregate_train(1, replies)
    return strategy, metrics


def _plain_rule(strategy, means, precisions):
    """The server update and dual sums of strategies/bayes_admm.py's list functions, on the wire."""
    from strategies.bayes_admm import accumulate_duals, client_dual_increment, server_update

    means = [np.asarray(m, np.float32).astype(np.float64) for m in means]
    precisions = [np.asarray(s, np.float32).astype(np.float64) for s in precisions]
    received, sent_precision = np.zeros(3), strategy.prior_precision
    increments = [client_dual_increment(received, sent_precision, m, s, strategy.cfg.admm_rho,
                                        strategy.cfg.dual_damping)
                  for m, s in zip(means, precisions)]
    duals = accumulate_duals(type(strategy.duals).zeros_like(received), increments)
    update = server_update(means, precisions, duals.mean, duals.precision, strategy.cfg.admm_rho,
                           strategy.prior_precision, strategy.num_clients)
    return strategy.on_the_wire(update.mean), strategy.on_the_wire(update.precision), duals


HONEST_MEANS = [[0.1, -0.2, 0.3], [0.2, -0.1, 0.2], [0.0, -0.3, 0.4], [0.15, -0.25, 0.35]]
HONEST_PRECISIONS = [[2.0, 3.0, 4.0], [3.0, 2.0, 4.0], [2.5, 2.5, 3.0], [2.0, 4.0, 3.5]]


@pytest.mark.parametrize("overrides", [{}, {"aggregation": "multi-krum", "krum-byzantine": 0}])
def test_without_a_left_out_reply_the_server_keeps_the_plain_rule_bit_for_bit(fake_grid, overrides):
    """The default (`aggregation = "mean"`), and multi-krum when it keeps every reply (f = 0),
    give bit for bit the list functions' update and dual sums: the combiner off changes nothing."""
    means, precisions = HONEST_MEANS + [[0.05, -0.15, 0.25]], HONEST_PRECISIONS + [[3.0] * 3]
    strategy, metrics = _multi_krum_round(fake_grid, overrides, means, precisions)
    mean, precision, duals = _plain_rule(strategy, means, precisions)
    assert strategy.mean.tobytes() == mean.tobytes()
    assert strategy.precision.tobytes() == precision.tobytes()
    assert strategy.duals.mean.tobytes() == duals.mean.tobytes()
    assert strategy.duals.precision.tobytes() == duals.precision.tobytes()
    assert sorted(strategy.accepted_round) == [1, 2, 3, 4, 5]
    assert metrics.get("left-out-replies", 0) == 0


def test_multi_krum_leaves_out_a_hostile_reply_and_its_dual_increment(fake_grid):
    """Node 5 sends the mean 50 (inside the default mean-shift bound of 1000 prior standard
    deviations, so no bound clips it): multi-krum leaves it out, logs why, does not mark it
    accepted, and the server's update is the plain rule over the four others, bit for bit."""
    means, precisions = HONEST_MEANS + [[50.0] * 3], HONEST_PRECISIONS + [[3.0] * 3]
    strategy, metrics = _multi_krum_round(fake_grid, {"aggregation": "multi-krum"}, means, precisions)
    assert metrics["left-out-replies"] == 1 and metrics["clipped-replies"] == 0
    assert strategy.last_round.reasons == [
        "node 5: left out by multi-krum, dual increment not accepted"]
    assert sorted(strategy.accepted_round) == [1, 2, 3, 4]
    mean, precision, duals = _plain_rule(strategy, HONEST_MEANS, HONEST_PRECISIONS)
    assert strategy.mean.tobytes() == mean.tobytes()
    assert strategy.precision.tobytes() == precision.tobytes()
    assert strategy.duals.mean.tobytes() == duals.mean.tobytes()
    assert strategy.duals.precision.tobytes() == duals.precision.tobytes()
    # Undefended, the same reply drags the mean toward 50.
    plain, _ = _multi_krum_round(fake_grid, {}, means, precisions)
    assert np.all(plain.mean > 5 * np.abs(strategy.mean))


def test_multi_krum_leaves_out_a_real_hostile_node_and_the_duals_stay_in_step():
    """Five real IVON nodes, multi-krum (f = 1); node 5 sends the pinning reply in rounds 2-3.
    It is left out those rounds (multi-krum decides before the bounds), its node does not
    commit the increment, and the server's dual sums equal what the nodes hold every round
    (checked by the helper). In the other rounds multi-krum leaves out an honest node (measured:
    nodes 4, 2, 4 in rounds 1, 4, 5)."""
    overrides = {"aggregation": "multi-krum", "min-train-nodes": 5}
    for server_round, (strategy, metrics) in enumerate(
        _federation_with_a_hostile_round(overrides, (2, 3), 5, num_nodes=5), start=1
    ):
        assert metrics["left-out-replies"] == 1
        if server_round in (2, 3):
            assert "node 5: left out by multi-krum, dual increment not accepted" in \
                strategy.last_round.reasons
            assert strategy.accepted_round.get(5, 0) < server_round
        assert np.isfinite(strategy.mean).all() and np.all(strategy.precision < 1e12)
