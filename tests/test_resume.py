"""Checkpoints after every round, and resuming a run whose ServerApp died."""

import json
import logging
import shutil

import numpy as np
import pytest

from benchmarks.inprocess import InProcessGrid, _set_task_identity, default_run_config
from server_app.app import run
from server_app.checkpoint import CHECKPOINT, load_checkpoint
from task.config import ConfigError, parse_run_config
from task.methods import METHODS


class ServerDied(Exception):
    pass


class CrashingGrid(InProcessGrid):
    """Raises out of the ServerApp during the training exchange of round `crash_round`."""

    def __init__(self, run_config, num_nodes, crash_round):
        super().__init__(run_config, num_nodes)
        self.crash_round = crash_round

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.group_id == str(self.crash_round):
            raise ServerDied
        return super().send_and_receive(messages, timeout=timeout)


# Beyond each method's short run: FedAvg with server momentum, whose state a resume must restore.
SERVER_STATE = {"fedavg": {"server-momentum": 0.9, "server-lr": 0.5}}


def _base(strategy):
    return {**default_run_config(), "strategy": strategy, "model": "logreg", "num-server-rounds": 4,
            "fraction-train": 0.5, "min-train-nodes": 2, "fraction-evaluate": 0.0,
            **METHODS[strategy].short_run, **SERVER_STATE.get(strategy, {})}


def _crash_at_round_3(tmp_path, base):
    """Run `base` in tmp_path/broken until the ServerApp dies in round 3."""
    broken = {**base, "output-dir": str(tmp_path / "broken")}
    with pytest.raises(ServerDied):
        run(CrashingGrid(broken, 6, crash_round=3), parse_run_config(broken))
    assert load_checkpoint(tmp_path / "broken").round == 2
    return {**broken, "resume-from": str(tmp_path / "broken"), "output-dir": ""}


class NewFlowerRun(InProcessGrid):
    """The nodes of a new Flower run: new Contexts with empty memory, another run id and new
    node ids (Flower draws them per simulation; these keep the old ones' order, so that node
    sampling and summation order, and with them the results, can match bit for bit)."""

    def __init__(self, run_config, num_nodes):
        super().__init__(run_config, num_nodes)
        self.contexts = {1000 + node: context for node, context in self.contexts.items()}
        for node, context in self.contexts.items():
            context.run_id, context.node_id = 2, node
        self.node_ids = sorted(self.contexts)


def _new_flower_run(run_config, num_nodes):
    return NewFlowerRun(run_config, num_nodes)


@pytest.mark.parametrize("strategy", sorted(METHODS))
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, strategy, caplog):
    _set_task_identity()
    base = _base(strategy)
    whole = {**base, "output-dir": str(tmp_path / "whole")}
    run(InProcessGrid(whole, 6), parse_run_config(whole))
    # The nodes deleted their state at the end of the run, and the server its empty folder.
    assert not (tmp_path / "whole" / "client-state").exists()

    resumed = _crash_at_round_3(tmp_path, base)
    if strategy == "bayes-admm":  # simulated nodes filed their state in the run's folder
        assert sorted(p.name for p in (tmp_path / "broken" / "client-state").iterdir())
    with caplog.at_level(logging.INFO, logger="flwr"):
        run(_new_flower_run(resumed, 6), parse_run_config(resumed))
    restored = [r for r in caplog.records if "Restored client state" in r.getMessage()]
    assert bool(restored) == (strategy == "bayes-admm")

    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "broken" / "results.json").read_text())
    assert [r["round"] for r in b["rounds"]] == [1, 2, 3, 4] and b["resumed_at_round"] == [2]
    for key in ("accuracy", "nll", "ece", "sampled", "replies"):
        assert [r[key] for r in a["rounds"]] == [r[key] for r in b["rounds"]], key
    with np.load(tmp_path / "whole" / "model.npz") as x, np.load(tmp_path / "broken" / "model.npz") as y:
        assert x.files == y.files
        for k in set(x.files) - {"__run_id__"}:  # two runs, two ids
            np.testing.assert_array_equal(x[k], y[k])


def test_a_node_without_the_state_the_server_counts_on_answers_with_an_error(tmp_path):
    _set_task_identity()
    resumed = _crash_at_round_3(tmp_path, _base("bayes-admm"))
    checkpoint = load_checkpoint(tmp_path / "broken")
    accepted = dict(zip(checkpoint.strategy_arrays["accepted-clients"].tolist(),
                        checkpoint.strategy_arrays["accepted-rounds"].tolist()))
    assert set(accepted) <= {f"partition-{p}" for p in range(6)} and accepted
    shutil.rmtree(tmp_path / "broken" / "client-state")  # the nodes' state is gone
    run(_new_flower_run(resumed, 6), parse_run_config(resumed))

    rounds = json.loads((tmp_path / "broken" / "results.json").read_text())["rounds"]
    round_3 = rounds[2]
    assert round_3["round"] == 3 and round_3["failed"] > 0
    for problem in round_3["problems"]:
        if "client state lost" in problem:
            partition = int(problem.split()[1].rstrip(":")) - 1001  # NewFlowerRun's node ids
            assert (
                f"the server's dual sums hold this node's duals up to round "
                f"{accepted[f'partition-{partition}']}, the node has no client state (file "
                f"{tmp_path / 'broken' / 'client-state' / f'partition-{partition}'}"
            ) in problem
    # Every sampled node the server had accepted refused; none trained on zero duals.
    refused = sum("client state lost" in p for r in rounds[2:] for p in r["problems"])
    assert refused == sum(r["failed"] for r in rounds[2:]) > 0


def test_a_finished_bayes_admm_run_cannot_be_extended(tmp_path):
    _set_task_identity()
    first = {**_base("bayes-admm"), "num-server-rounds": 1, "output-dir": str(tmp_path / "old")}
    run(InProcessGrid(first, 3), parse_run_config(first))
    more = {**first, "num-server-rounds": 2, "resume-from": str(tmp_path / "old")}
    with pytest.raises(ConfigError, match="finished at round 1 and its nodes deleted their"):
        run(InProcessGrid(more, 3), parse_run_config(more))


def _cfg(tmp_path, **overrides):
    return parse_run_config({**default_run_config(), "model": "logreg", "num-server-rounds": 3,
                             "output-dir": str(tmp_path / "new"), **overrides})


def test_resume_from_a_missing_checkpoint_fails_clearly_and_writes_nothing(tmp_path):
    _set_task_identity()
    cfg = _cfg(tmp_path, **{"resume-from": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="no checkpoint"):
        run(InProcessGrid(cfg.to_dict(), 2), cfg)
    assert not (tmp_path / "new").exists()


def test_resume_from_a_corrupt_checkpoint_fails_clearly(tmp_path):
    _set_task_identity()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / CHECKPOINT).write_bytes(b"not a zip")
    cfg = _cfg(tmp_path, **{"resume-from": str(tmp_path / "old")})
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        run(InProcessGrid(cfg.to_dict(), 2), cfg)
    assert not (tmp_path / "new").exists()


def test_resume_with_a_different_experiment_is_refused(tmp_path):
    _set_task_identity()
    first = _cfg(tmp_path, **{"output-dir": str(tmp_path / "old"), "num-server-rounds": 1})
    run(InProcessGrid(first.to_dict(), 2), first)
    cfg = _cfg(tmp_path, **{"resume-from": str(tmp_path / "old"), "lr": 0.5})
    with pytest.raises(ConfigError, match="'lr' = 0.5 but the checkpoint was made with 'auto'"):
        run(InProcessGrid(cfg.to_dict(), 2), cfg)
    finished = _cfg(tmp_path, **{"resume-from": str(tmp_path / "old"), "num-server-rounds": 1})
    with pytest.raises(ConfigError, match="nothing left to run"):
        run(InProcessGrid(finished.to_dict(), 2), finished)


@pytest.mark.e2e
def test_a_stopped_flwr_simulation_resumes_with_every_nodes_duals(tmp_path):
    """The real thing: `flwr stop` a BayesADMM simulation after a checkpoint, then `flwr run`
    with `resume-from` starts a new Flower run (empty node memory, new node ids). Every node
    must find its duals in <output-dir>/client-state: a node without them would refuse with an
    error reply (`failed`)."""
    import time

    from tests.flower_runs import LocalFederation

    out = tmp_path / "out"
    # Far more than run before `flwr stop` lands: a stop takes effect seconds after it is sent,
    # and on an idle machine 40 rounds of this model ended first. The resume runs only 2 more.
    rounds = 400
    settings = ("strategy='bayes-admm' optimizer='ivon' model='logreg' local-epochs=1 "
                "fraction-evaluate=0.0 eval-mc-samples=2")
    federation = LocalFederation(tmp_path / "flwr-home")
    try:
        started = federation.flwr("run", ".", "--format", "json", "--run-config",
                                  f"{settings} num-server-rounds={rounds} output-dir='{out}'", "--federation-config",
                                  "num-supernodes=4")
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = json.loads(started.stdout)["run-id"]
        deadline = time.monotonic() + 300
        while not ((out / CHECKPOINT).exists() and load_checkpoint(out).round >= 1):
            assert time.monotonic() < deadline, federation.flwr("log", str(run_id), "--show").stdout
            time.sleep(0.2)
        assert federation.flwr("stop", str(run_id)).returncode == 0
        # The stopped ServerApp may finish a round or two before it ends: wait until the
        # checkpoint stays put.
        stopped_at, still_since = load_checkpoint(out).round, time.monotonic()
        while time.monotonic() - still_since < 10:
            assert time.monotonic() < deadline, "the stopped run kept writing checkpoints"
            time.sleep(0.5)
            if (now := load_checkpoint(out).round) != stopped_at:
                stopped_at, still_since = now, time.monotonic()
        assert stopped_at < rounds and list((out / "client-state").iterdir())

        # Two more rounds are enough to show every node going on (a resume may change only the
        # number of rounds, among the settings that shape the model).
        rounds = stopped_at + 2
        resumed = federation.run(f"{settings} num-server-rounds={rounds} resume-from='{out}'",
                                 num_supernodes=4)
        assert resumed.status == "finished:completed", resumed.logs
    finally:
        federation.stop()
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == list(range(1, rounds + 1))
    continued = [r for r in results["rounds"] if r["round"] > results["resumed_at_round"][0]]
    assert all(r["failed"] == 0 and r["replies"] == 4 for r in continued), continued
    assert not (out / "client-state").exists()  # the nodes deleted their state at the end


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def finished_checkpoint(tmp_path_factory):
    """A one-round FedAvg run (server momentum, so the strategy state has arrays of its own)."""
    _set_task_identity()
    folder = tmp_path_factory.mktemp("ckpt") / "old"
    cfg = _cfg(folder.parent, **{"output-dir": str(folder), "num-server-rounds": 1,
                                 "server-momentum": 0.5})
    run(InProcessGrid(cfg.to_dict(), 2), cfg)
    with np.load(folder / CHECKPOINT) as npz:
        return {k: npz[k] for k in npz.files}


def _meta(arrays, **changes):
    meta = json.loads(str(arrays["__meta__"]))
    for key, value in changes.items():
        if value is DELETE:
            del meta[key]
        else:
            meta[key] = value
    return {**arrays, "__meta__": np.array(json.dumps(meta))}


DELETE = object()


def _with_config(arrays, **changes):
    meta = json.loads(str(arrays["__meta__"]))
    for key, value in changes.items():
        if value is DELETE:
            del meta["config"][key]
        else:
            meta["config"][key] = value
    return {**arrays, "__meta__": np.array(json.dumps(meta))}


def _reshaped(arrays, prefix):
    key = next(k for k in arrays if k.startswith(prefix))
    return {**arrays, key: np.zeros(arrays[key].size + 1, arrays[key].dtype)}


DAMAGED = [
    pytest.param(lambda a: None, "not a readable checkpoint", id="empty-file"),
    pytest.param(lambda a: _meta(a, round=DELETE), "its metadata lacks 'round'", id="no-round"),
    pytest.param(lambda a: _meta(a, state_key=DELETE), "its metadata lacks 'state_key'", id="no-state-key"),
    pytest.param(lambda a: _meta(a, round="1"), "metadata 'round' = '1' is not an integer", id="round-str"),
    pytest.param(lambda a: _meta(a, round=True), "metadata 'round' = True is not an integer", id="round-bool"),
    pytest.param(lambda a: _meta(a, config=[]), "metadata 'config' = [] is not an object", id="config-list"),
    pytest.param(lambda a: _meta(a, round=-3), "round = -3 is negative", id="round=-3"),
    pytest.param(lambda a: {**a, "__meta__": np.array("[1, 2]")}, "its metadata is a list", id="meta-list"),
    pytest.param(lambda a: _reshaped(a, "global/"), "this run needs float32", id="global-shape"),
    pytest.param(lambda a: _reshaped(a, "strategy/params/"), "this run needs float32", id="strategy-shape"),
    pytest.param(lambda a: {k: v for k, v in a.items() if k != "strategy/params/0"},
                 "strategy arrays do not fit this run (missing ['params/0']", id="strategy-key-missing"),
    pytest.param(lambda a: {**a, "global/extra": np.zeros(2, np.float32)},
                 "global arrays do not fit this run (missing [], unexpected ['extra'])", id="global-key-extra"),
    pytest.param(lambda a: {k: (v.astype(np.float64) if k.startswith("global/") else v) for k, v in a.items()},
                 "is float64", id="global-dtype"),
    pytest.param(lambda a: {k: (v * np.nan if k.startswith("global/") else v) for k, v in a.items()},
                 "has non-finite values", id="global-nan"),
    pytest.param(lambda a: _meta(a, strategy={}), "strategy state does not fit (KeyError: 'rng')",
                 id="strategy-meta-missing"),
    pytest.param(lambda a: _with_config(a, **{"no-such-key": 1}),
                 "the checkpoint's config has key 'no-such-key' this version does not know",
                 id="config-unknown-key"),
    pytest.param(lambda a: _with_config(a, lr=DELETE), "'lr' = 0.5 but the checkpoint predates the key",
                 id="config-key-missing"),
]


@pytest.mark.parametrize(("damage", "message"), DAMAGED)
def test_a_damaged_checkpoint_is_one_line_before_anything_is_written(tmp_path, finished_checkpoint,
                                                                     damage, message):
    _set_task_identity()
    old = tmp_path / "old"
    old.mkdir()
    arrays = damage(finished_checkpoint)
    if arrays is None:
        (old / CHECKPOINT).write_bytes(b"")
    else:
        np.savez(old / CHECKPOINT, **arrays)
    overrides = {"resume-from": str(old), "server-momentum": 0.5}
    if "lr" in message:
        overrides["lr"] = 0.5
    cfg = _cfg(tmp_path, **overrides)
    with pytest.raises(ConfigError) as info:
        run(InProcessGrid(cfg.to_dict(), 2), cfg)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("resume-from: ")
    assert not (tmp_path / "new").exists()


def test_the_undamaged_checkpoint_resumes(tmp_path, finished_checkpoint):
    _set_task_identity()
    (tmp_path / "old").mkdir()
    np.savez(tmp_path / "old" / CHECKPOINT, **finished_checkpoint)
    cfg = _cfg(tmp_path, **{"resume-from": str(tmp_path / "old"), "server-momentum": 0.5,
                            "num-server-rounds": 2})
    run(InProcessGrid(cfg.to_dict(), 2), cfg)
    results = json.loads((tmp_path / "new" / "results.json").read_text())
    assert results["status"] == "completed" and results["resumed_at_round"] == [1]
    assert results["run_id"] == str(finished_checkpoint["__run_id__"])  # the run id carries over


def test_a_compressed_run_resumes_with_one_full_downlink(tmp_path):
    """The checkpoint keeps no downlink reference (the resumed run's node ids are new): the first
    round after the resume sends the global in full, the next ones differences again, and no
    node is asked for a difference to a global it does not hold."""
    _set_task_identity()
    base = {**_base("bayes-admm"), "uplink-codec": "q8", "downlink-codec": "q8",
            "fraction-train": 1.0}
    resumed = _crash_at_round_3(tmp_path, base)
    run(_new_flower_run(resumed, 6), parse_run_config(resumed))
    rounds = json.loads((tmp_path / "broken" / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["failed"] == 0 and r["replies"] == 6 for r in rounds), rounds
    assert [r["compression_down"] == 1.0 for r in rounds] == [True, False, True, False]
    assert rounds[3]["compression_down"] > 2 and rounds[2]["compression_up"] > 2
