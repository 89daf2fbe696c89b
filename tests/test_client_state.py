import re

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

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


HOSTILE_KEYS = ["../x", "a/b", "", "x" * 65, "/abs", "k\x00", "..", ".", "k.npz", "ké", "a b"]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_a_state_key_that_is_not_a_plain_name_is_refused(tmp_path, key):
    with pytest.raises(ClientStateError, match="state-key") as refused:
        ClientState(_context({"state-dir": str(tmp_path / "state")}), key=key)
    assert len(str(refused.value)) < 200  # one short line, even for a long key
    assert not (tmp_path / "state").exists()


def _tree(root):
    """Every path under root with its bytes (None for a folder), to compare before and after."""
    return {p.relative_to(root): (None if p.is_dir() else p.read_bytes()) for p in root.rglob("*")}


def _finish_message(config):
    from flwr.app import ConfigRecord, Message, MessageType

    from task import records

    content = RecordDict({records.CONFIG: ConfigRecord(config)})
    return Message(content, dst_node_id=1, message_type=f"{MessageType.QUERY}.{records.FINISH_ACTION}")


@pytest.mark.parametrize("key", ["/../../victim", "x/../../../victim-node-1", "../victim", "run-k\x00"])
def test_a_hostile_state_key_never_writes_or_deletes_outside_the_state_folder(tmp_path, key):
    from client_app.app import finish
    from task import records

    state_dir = tmp_path / "state"
    ClientState(_context({"state-dir": str(state_dir)}), key="k").save({"dual": np.ones(2)}, 1)
    for victim in ("victim.npz", "victim-node-1.npz", "run-x.npz"):
        np.savez(tmp_path / victim, a=np.zeros(1))
    (state_dir / "run-other.npz").write_bytes(b"another run's file")
    before = _tree(tmp_path)

    reply = finish(_finish_message({records.STATE_KEY: key}), _context({"state-dir": str(state_dir)}))
    assert reply.has_error() and "state-key" in reply.error.reason
    with pytest.raises(ClientStateError, match="state-key"):
        ClientState(_context({"state-dir": str(state_dir)}), key=key).save({"dual": np.zeros(2)}, 2)
    assert _tree(tmp_path) == before


def test_two_nodes_sharing_a_state_dir_keep_their_own_duals(tmp_path):
    def node(node_id):  # a fresh context: empty memory, as after a restart
        return Context(run_id=7, node_id=node_id, node_config={"state-dir": str(tmp_path)},
                       state=RecordDict(), run_config={})

    ClientState(node(11), key="k").save({"dual": np.full(3, 1.0)}, server_round=2)
    ClientState(node(22), key="k").save({"dual": np.full(3, 2.0)}, server_round=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-k-node-11.npz", "run-k-node-22.npz"]
    np.testing.assert_array_equal(ClientState(node(11), key="k").load()["dual"], np.full(3, 1.0))
    np.testing.assert_array_equal(ClientState(node(22), key="k").load()["dual"], np.full(3, 2.0))
    assert ClientState(node(33), key="k").load() == {}
    ClientState(node(11), key="k").clear()  # the end of the run on node 11 leaves node 22's file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-k-node-22.npz"]


def test_a_state_file_or_folder_that_links_elsewhere_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    np.savez(outside / "run-k-node-1.npz", dual=np.full(2, 9.0))
    np.savez(outside / "run-k-partition-3.npz", dual=np.full(2, 9.0))
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    np.savez(state_dir / "run-k-node-2.npz", dual=np.full(2, 5.0))  # another node's file
    root = tmp_path / "client-state"
    root.mkdir()
    (root / "partition-3").symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    for target in (outside / "run-k-node-1.npz", state_dir / "run-k-node-2.npz"):
        (state_dir / "run-k-node-1.npz").unlink(missing_ok=True)
        (state_dir / "run-k-node-1.npz").symlink_to(target)
        with pytest.raises(ClientStateError, match="symbolic link"):
            ClientState(_context({"state-dir": str(state_dir)}), key="k")
    (state_dir / "run-k-node-1.npz").unlink()
    (state_dir / "run-k-node-1.npz.lock").symlink_to(outside / "made.lock")
    with pytest.raises(ClientStateError, match="symbolic link"):
        ClientState(_context({"state-dir": str(state_dir)}), key="k")
    with pytest.raises(ClientStateError, match="symbolic link"):
        ClientState(_context(SIMULATED), key="k", client_state_dir=str(root))
    assert _tree(outside) == before


def test_the_lock_is_held_for_a_message_and_removed_after(tmp_path):
    from client_app.state import lock_path

    state = ClientState(_context({"state-dir": str(tmp_path)}), key="k")
    with state:
        with state:  # the handler's own load and save inside its message: same holder
            state.save({"dual": np.ones(2)}, 1)
            assert state.load()["dual"].tolist() == [1.0, 1.0]
        assert "node-1 of Flower run 7, pid" in lock_path(state.path).read_text()
        with pytest.raises(ClientStateError, match="in use by another node"):
            ClientState(_context({"state-dir": str(tmp_path)}), key="k").load()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-k-node-1.npz"]
    ClientState(_context({"state-dir": str(tmp_path)}), key="k").save({"dual": np.zeros(2)}, 2)


HOLDER = """
import sys
import numpy as np
from flwr.app import Context, RecordDict
from client_app.state import ClientState

context = Context(run_id=7, node_id=1, node_config={"state-dir": sys.argv[1]}, state=RecordDict(),
                  run_config={})
with ClientState(context, key="k") as state:
    state.save({"dual": np.ones(2)}, 1)
    print("holding", flush=True)
    sys.stdin.readline()
"""


def test_a_file_locked_by_another_process_gets_an_error_reply_naming_the_holder(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from client_app.app import finish
    from task import records

    repo = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=repo,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        ctx = _context({"state-dir": str(tmp_path)})
        reply = finish(_finish_message({records.STATE_KEY: "k"}), ctx)
        assert reply.has_error()
        assert reply.error.reason.startswith(f"state file {tmp_path / 'run-k-node-1.npz'} is in use by "
                                             f"another node (node-1 of Flower run 7, pid {holder.pid} on ")
        assert "give each node its own state-dir" in reply.error.reason
        assert (tmp_path / "run-k-node-1.npz").exists()  # not deleted under the holder
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    assert not finish(_finish_message({records.STATE_KEY: "k"}), ctx).has_error()
    assert list(tmp_path.iterdir()) == []


def test_a_file_from_before_node_identities_is_named_not_read(tmp_path):
    np.savez(tmp_path / "run-k.npz", __round__=np.int64(3), dual=np.ones(2))
    state = ClientState(_context({"state-dir": str(tmp_path)}), key="k")
    assert state.load() == {}
    assert state.where() == (
        f"file {tmp_path / 'run-k-node-1.npz'}; run-k.npz there is from a version without node "
        "identities in file names, rename it if it is this node's"
    )


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


KEY_CHARS = st.characters(codec="utf-8") | st.sampled_from("./\\\x00-_aZ09")


@settings(max_examples=200, deadline=None)
@given(key=st.text(KEY_CHARS, max_size=70) | st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
       node_id=st.integers(0, 2**64 - 1))
def test_any_state_key_is_refused_or_names_this_nodes_file_in_the_folder(tmp_path_factory, key, node_id):
    """Property: whatever key the server sends, the node either refuses it (touching nothing) or
    files its state as run-<key>-node-<id>.npz directly in its state folder."""
    folder = tmp_path_factory.getbasetemp() / "property-state"
    context = Context(run_id=7, node_id=node_id, node_config={"state-dir": str(folder)},
                      state=RecordDict(), run_config={})
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key, flags=re.ASCII):
        path = ClientState(context, key=key).path
        assert path == folder / f"run-{key}-node-{node_id}.npz"
        assert path.resolve().parent == folder.resolve()
    else:
        with pytest.raises(ClientStateError, match="state-key"):
            ClientState(context, key=key)
    assert not folder.exists()


def test_the_train_handler_holds_the_lock_for_its_whole_message(tmp_path, monkeypatch):
    from flwr.app import ConfigRecord, Message, MessageType

    from benchmarks.inprocess import _set_task_identity, default_run_config
    from client_app import app as client_app
    from client_app.state import lock_path
    from task import records

    _set_task_identity()
    held = []

    def step(round_):
        held.append(lock_path(round_.state.path).read_text())
        with pytest.raises(ClientStateError, match="in use by another node"):  # a second node
            ClientState(_context({"state-dir": str(tmp_path)}), key="k").load()
        return RecordDict()

    monkeypatch.setitem(client_app.CLIENT_STEPS, "fedavg", step)
    run_config = {**default_run_config(), "strategy": "fedavg", "model": "logreg"}
    content = RecordDict({records.CONFIG: ConfigRecord({records.STATE_KEY: "k", records.SERVER_ROUND: 1})})
    context = Context(run_id=7, node_id=1, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path)})
    reply = client_app.train(Message(content, dst_node_id=1, message_type=MessageType.TRAIN), context)
    assert not reply.has_error()
    assert len(held) == 1 and held[0].startswith("node-1 of Flower run 7, pid ")
    assert not lock_path(tmp_path / "run-k-node-1.npz").exists()  # released with the reply
