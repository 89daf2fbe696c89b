import numpy as np
from flwr.app import Context, RecordDict

from client_app.state import ClientState


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
    assert (tmp_path / "run-7.npz").exists()
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-7.npz"]
    np.testing.assert_array_equal(ClientState(_context({"state-dir": str(tmp_path)})).load()["a"], np.zeros(2))


def test_clear_removes_memory_and_disk(tmp_path):
    ctx = _context({"state-dir": str(tmp_path)})
    ClientState(ctx).save({"a": np.zeros(2)}, 1)
    ClientState(ctx).clear()
    assert ClientState(ctx).load() == {} and not (tmp_path / "run-7.npz").exists()


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
    saved_round, saved = read_state_file(tmp_path / "run-7.npz")
    assert saved_round == 4 and state_digest(saved) == state_digest(arrays)

    with caplog.at_level(logging.INFO, logger="flwr"):
        restarted = _context({"state-dir": str(tmp_path)})  # empty memory
        ClientState(restarted).load()
        ClientState(restarted).save(arrays, server_round=5)
        ClientState(restarted).load()  # memory is current now: no second restore
    restores = [r.getMessage() for r in caplog.records if "Restored client state" in r.getMessage()]
    assert restores == [
        f"Restored client state of run 7 from {tmp_path / 'run-7.npz'} "
        f"(round 4, sha256 {state_digest(arrays)})"
    ]
