import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client_app.state import ClientState, ClientStateError, state_folder


def _context(node_config, run_id=7, state=None):
    return Context(run_id=run_id, node_id=1, node_config=node_config,
                   state=state if state is not None else RecordDict(), run_config={})


def test_state_round_trips_in_memory_without_a_state_dir():
    ctx = _context({})
    ClientState(ctx).save({"dual": np.arange(3.0)}, server_round=2)
    loaded = ClientState(ctx).load()
    np.testing.assert_array_equal(loaded["dual"], np.arange(3.0))


def test_restarted_node_reloads_its_state_from_disk(tmp_path):
    ClientState(_context({"state-dir": str(tmp_path)})).save({"dual": np.ones(4)}, server_round=3)
    assert (tmp_path / "run-7-node-1.npz").exists()
    # A restarted SuperNode hands the ClientApp an empty context.state.
    loaded = ClientState(_context({"state-dir": str(tmp_path)})).load()
    np.testing.assert_array_equal(loaded["dual"], np.ones(4))
    # Another run on the same node does not see it.
    assert ClientState(_context({"state-dir": str(tmp_path)}, run_id=8)).load() == {}


def test_newer_memory_wins_over_an_older_disk_copy(tmp_path):
    shared = RecordDict()
    ClientState(_context({"state-dir": str(tmp_path)}, state=shared)).save({"a": np.zeros(1)}, 1)
    ClientState(_context({}, state=shared)).save({"a": np.full(1, 5.0)}, 2)  # memory only
    loaded = ClientState(_context({"state-dir": str(tmp_path)}, state=shared)).load()
    np.testing.assert_array_equal(loaded["a"], [5.0])


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    state = ClientState(_context({"state-dir": str(tmp_path)}))
    state.save({"a": np.zeros(2)}, 1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("task.files.os.replace", crash)
    try:
        state.save({"a": np.ones(2)}, 2)
    except OSError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-7-node-1.npz"]
    np.testing.assert_array_equal(ClientState(_context({"state-dir": str(tmp_path)})).load()["a"], np.zeros(2))


def test_clear_removes_memory_and_disk(tmp_path):
    ctx = _context({"state-dir": str(tmp_path)})
    ClientState(ctx).save({"a": np.zeros(2)}, 1)
    ClientState(ctx).clear()
    assert ClientState(ctx).load() == {} and not (tmp_path / "run-7-node-1.npz").exists()


def test_digest_covers_keys_values_dtypes_and_shapes():
    import hashlib

    from client_app.state import state_digest

    a = np.arange(6.0).reshape(2, 3)
    expected = hashlib.sha256(b"a|<f8|(2, 3)|" + a.tobytes()).hexdigest()
    assert state_digest({"a": a}) == expected
    assert state_digest({"a": a, "b": np.zeros(1)}) == state_digest({"b": np.zeros(1), "a": a})
    assert state_digest({"a": a.reshape(3, 2)}) != expected
    assert state_digest({"a": a.astype(np.float32)}) != expected
    assert state_digest({"x": a}) != expected


def test_restore_from_disk_logs_round_and_digest_once_memory_is_empty(tmp_path, caplog):
    import logging

    from client_app.state import read_state_file, state_digest

    arrays = {"dual": np.linspace(0, 1, 5), "count": np.array([3])}
    ClientState(_context({"state-dir": str(tmp_path)})).save(arrays, server_round=4)
    saved_round, saved = read_state_file(tmp_path / "run-7-node-1.npz")
    assert saved_round == 4 and state_digest(saved) == state_digest(arrays)

    with caplog.at_level(logging.INFO, logger="flwr"):
        restarted = _context({"state-dir": str(tmp_path)})  # empty memory
        ClientState(restarted).load()
        ClientState(restarted).save(arrays, server_round=5)
        ClientState(restarted).load()  # memory is current now: no second restore
    restores = [r.getMessage() for r in caplog.records if "Restored client state" in r.getMessage()]
    assert restores == [
        f"Restored client state of run 7 from {tmp_path / 'run-7-node-1.npz'} "
        f"(round 4, sha256 {state_digest(arrays)})"
    ]


SIMULATED = {"partition-id": 3, "num-partitions": 5}


def test_a_simulated_node_keeps_its_state_in_its_partition_folder_of_the_servers_folder(tmp_path):
    root = tmp_path / "client-state"
    root.mkdir()
    state = ClientState(_context(SIMULATED), key="abc123", client_state_dir=str(root))
    assert state.path == root / "partition-3" / "run-abc123-partition-3.npz"
    state.save({"dual": np.ones(2)}, server_round=1)
    # A resumed run: a new Flower run id, empty memory, same state key.
    again = ClientState(_context(SIMULATED, run_id=99), key="abc123", client_state_dir=str(root))
    np.testing.assert_array_equal(again.load()["dual"], np.ones(2))


def test_state_dir_wins_and_operators_nodes_never_use_the_servers_folder(tmp_path):
    root = tmp_path / "client-state"
    root.mkdir()
    own = tmp_path / "own"
    assert state_folder({**SIMULATED, "state-dir": str(own)}, str(root)) == own
    assert state_folder({"data-path": "/data/x.npz"}, str(root)) is None
    assert state_folder({**SIMULATED, "data-path": "/data/x.npz"}, str(root)) is None
    assert state_folder(SIMULATED, None) is None


def test_a_node_on_another_machine_than_the_server_keeps_state_in_memory(tmp_path):
    missing = tmp_path / "server-only" / "client-state"
    state = ClientState(_context(SIMULATED), key="k", client_state_dir=str(missing))
    state.save({"dual": np.ones(2)}, server_round=1)
    assert state.path is None and not (tmp_path / "server-only").exists()
    assert "memory only" in state.where()


@pytest.mark.parametrize("sent", ["relative/client-state", "/tmp/x/../client-state", "/etc"])
def test_a_malformed_client_state_dir_from_the_server_is_refused(sent):
    with pytest.raises(ClientStateError, match="client-state-dir"):
        state_folder(SIMULATED, sent)


@pytest.mark.parametrize("key", ["../x", "a/b", "", "x" * 65, "/abs"])
def test_a_state_key_that_is_not_a_plain_name_is_refused(tmp_path, key):
    with pytest.raises(ClientStateError, match="state-key"):
        ClientState(_context({"state-dir": str(tmp_path)}), key=key)


def test_a_train_message_that_needs_lost_duals_gets_an_error_reply(tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType

    from benchmarks.inprocess import _set_task_identity, default_run_config
    from client_app.app import app
    from task import records
    from task.config import parse_run_config
    from task.data import data_spec
    from task.models import build_model
    from task.params import model_to_record

    _set_task_identity()
    run_config = {**default_run_config(), "strategy": "bayes-admm", "optimizer": "ivon",
                  "model": "logreg"}
    cfg = parse_run_config(run_config)
    weights = model_to_record(build_model(cfg, data_spec(cfg)))
    root = tmp_path / "client-state"
    root.mkdir()
    config = ConfigRecord({records.STATE_KEY: "k1", records.CLIENT_STATE_DIR: str(root),
                           records.SERVER_ROUND: 3, records.AT_PRIOR: False,
                           records.ACCEPTED_ROUND: 2})
    content = RecordDict({records.ARRAYS: weights, records.PRECISION: weights,
                          records.CONFIG: config})
    message = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(run_id=5, node_id=1, node_config=SIMULATED, state=RecordDict(),
                      run_config=run_config)
    reply = app(message, context)
    assert reply.has_error()
    assert reply.error.reason == (
        "BayesADMM client state lost: the server's dual sums hold this node's duals up to round 2, "
        f"the node has no client state (file {root / 'partition-3' / 'run-k1-partition-3.npz'}), so it does "
        "not train (its duals would disagree with the server's); restore the state file or start "
        "a new run"
    )
    assert list((root / "partition-3").iterdir()) == []  # nothing written, the lock released
