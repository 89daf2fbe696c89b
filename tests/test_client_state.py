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
