"""The ClientApp handlers called in-process with real Messages and Contexts."""

import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client_app.app import evaluate, train
from task import records
from task.config import parse_run_config
from task.data import data_spec, partition
from task.models import build_model
from task.params import model_to_record, record_to_numpy

DEFAULTS = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def _context(node_config, **run_config):
    return Context(
        run_id=1,
        node_id=42,
        node_config=node_config,
        state=RecordDict(),
        run_config={**DEFAULTS, **run_config},
    )


def _instruction(message_type, arrays, server_round=1):
    content = RecordDict(
        {records.ARRAYS: arrays, records.CONFIG: ConfigRecord({records.SERVER_ROUND: server_round})}
    )
    return Message(content, dst_node_id=42, message_type=message_type)


@pytest.fixture
def global_arrays():
    cfg = parse_run_config({**DEFAULTS, "model": "logreg"})
    return model_to_record(build_model(cfg, data_spec(cfg)))


def test_train_handler_returns_trained_weights_and_example_count(global_arrays):
    ctx = _context({"partition-id": 3, "num-partitions": 10}, model="logreg", **{"local-epochs": 1})
    out = train(_instruction(MessageType.TRAIN, global_arrays), ctx)
    assert not out.has_error()
    sent = record_to_numpy(global_arrays)
    got = record_to_numpy(out.content.array_records[records.ARRAYS])
    assert got.keys() == sent.keys()
    assert all(got[k].shape == sent[k].shape for k in got)
    assert any(not np.allclose(got[k], sent[k]) for k in got), "training did not move the weights"
    cfg = parse_run_config(ctx.run_config)
    local = partition(cfg, 3, 10)
    n_val = int(len(local) * 0.2)
    assert out.content.metric_records[records.METRICS][records.NUM_EXAMPLES] == len(local) - n_val


def test_train_is_deterministic_per_seed(global_arrays):
    outs = [
        train(
            _instruction(MessageType.TRAIN, global_arrays),
            _context({"partition-id": 0, "num-partitions": 5}, model="logreg"),
        )
        for _ in range(2)
    ]
    a, b = (record_to_numpy(o.content.array_records[records.ARRAYS]) for o in outs)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_evaluate_handler_scores_the_global_model(global_arrays):
    ctx = _context({"partition-id": 1, "num-partitions": 4}, model="logreg")
    out = evaluate(_instruction(MessageType.EVALUATE, global_arrays), ctx)
    metrics = out.content.metric_records[records.METRICS]
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["nll"] > 0 and 0 <= metrics["ece"] <= 1
    assert metrics[records.NUM_EXAMPLES] == int(len(partition(parse_run_config(ctx.run_config), 1, 4)) * 0.2)


def test_node_with_its_own_npz_trains_on_it(tmp_path, global_arrays):
    rng = np.random.default_rng(0)
    path = tmp_path / "site.npz"
    np.savez(path, x=rng.random((40, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 40))
    out = train(
        _instruction(MessageType.TRAIN, global_arrays),
        _context({"data-path": str(path)}, model="logreg"),
    )
    assert out.content.metric_records[records.METRICS][records.NUM_EXAMPLES] == 32


def test_node_without_data_gets_a_clear_error(global_arrays):
    from task.config import ConfigError

    with pytest.raises(ConfigError, match="data-path"):
        train(_instruction(MessageType.TRAIN, global_arrays), _context({}, model="logreg"))


def test_finish_query_removes_the_node_state(tmp_path):
    import numpy as np
    from client_app.app import finish
    from client_app.state import ClientState

    ctx = _context({"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path)})
    ClientState(ctx).save({"dual": np.ones(3)}, server_round=1)
    msg = Message(RecordDict(), dst_node_id=42, message_type=f"{MessageType.QUERY}.{records.FINISH_ACTION}")
    finish(msg, ctx)
    assert ClientState(ctx).load() == {} and list(tmp_path.iterdir()) == []


def test_fedavg_client_with_ivon_sends_the_ivon_mean(global_arrays):
    ctx = _context({"partition-id": 0, "num-partitions": 4}, model="logreg", optimizer="ivon",
                   **{"local-epochs": 1})
    out = train(_instruction(MessageType.TRAIN, global_arrays), ctx)
    got = record_to_numpy(out.content.array_records[records.ARRAYS])
    sent = record_to_numpy(global_arrays)
    assert all(np.isfinite(got[k]).all() for k in got)
    assert any(not np.allclose(got[k], sent[k]) for k in got)


def test_each_message_gets_its_own_weights_in_the_reused_module(global_arrays):
    """The process keeps one module per run and refills it per message; IVON-ADMM re-points the
    parameters into its own buffers while training, and the next message must still see exactly
    its own weights (and score like a freshly built model holding them)."""
    from client_app.app import _round
    from task.metrics import predict_probs
    from task.params import load_record

    ctx = _context({"partition-id": 0, "num-partitions": 4}, model="logreg", optimizer="ivon",
                   **{"local-epochs": 1})
    trained = train(_instruction(MessageType.TRAIN, global_arrays), ctx)
    other = trained.content.array_records[records.ARRAYS]
    for arrays in (other, global_arrays):
        round_, val = _round(_instruction(MessageType.EVALUATE, arrays), ctx)
        model = round_.model_at()
        got = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        want = record_to_numpy(arrays)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
        fresh = build_model(round_.cfg, round_.spec)
        load_record(fresh, arrays)
        assert np.array_equal(
            predict_probs(model, val.x, round_.device), predict_probs(fresh, val.x, round_.device)
        )


def _data_libraries_loaded_by_a_fresh_process(node_config: dict) -> list[str]:
    """Which of the heavy data libraries a new Python process loads to train and evaluate once."""
    import ast
    import subprocess
    import sys

    script = f"""
import sys
from benchmarks.inprocess import _set_task_identity
from tests.test_client_app import _context, _instruction
from client_app.app import evaluate, train
from flwr.app import MessageType
from task import records
from task.config import parse_run_config
from task.data import data_spec
from task.models import build_model
from task.params import model_to_record
_set_task_identity()
ctx = _context({node_config!r}, model="logreg", **{{"local-epochs": 1}})
cfg = parse_run_config(ctx.run_config)
arrays = model_to_record(build_model(cfg, data_spec(cfg)))
out = train(_instruction(MessageType.TRAIN, arrays), ctx)
assert not out.has_error()
evaluate(_instruction(MessageType.EVALUATE, out.content.array_records[records.ARRAYS]), ctx)
print(sorted(m for m in ("datasets", "flwr_datasets", "sklearn") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip().split("\n")[-1])


def test_a_fresh_clientapp_process_imports_no_data_library_it_does_not_need(tmp_path):
    """Each deployment message starts a fresh ClientApp process: `datasets` and `flwr_datasets`
    (seconds of imports) must not be loaded by a node that trains on its own file, nor by a
    partition node once its partition is in its state-dir."""
    rng = np.random.default_rng(0)
    path = tmp_path / "site.npz"
    np.savez(path, x=rng.random((40, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 40))
    assert _data_libraries_loaded_by_a_fresh_process({"data-path": str(path)}) == []

    node = {"partition-id": 1, "num-partitions": 4, "state-dir": str(tmp_path / "state")}
    assert _data_libraries_loaded_by_a_fresh_process(node) == ["datasets", "flwr_datasets", "sklearn"]
    assert len(list((tmp_path / "state" / "partitions").iterdir())) == 1
    assert _data_libraries_loaded_by_a_fresh_process(node) == []
