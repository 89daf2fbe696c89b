"""`client-test-fraction`: the seeded share of each client's data held out for client-side
evaluation, and 0 (no split, no client evaluation) end to end."""

import numpy as np
import pytest

from benchmarks.inprocess import default_run_config, simulate
from client_app.local import node_data
from task.config import ConfigError, parse_run_config
from task.data import ArrayData, split_train_val

NODE = (("num-partitions", 4), ("partition-id", 1))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.35])
def test_split_has_the_requested_size_and_is_seeded(fraction):
    data = ArrayData(np.arange(200, dtype=np.float32).reshape(100, 2), np.arange(100) % 10)
    train, val = split_train_val(data, fraction, seed=3)
    assert len(val) == int(100 * fraction) and len(train) + len(val) == 100
    assert sorted(np.concatenate([train.y, val.y]).tolist()) == sorted(data.y.tolist())
    again_train, again_val = split_train_val(data, fraction, seed=3)
    np.testing.assert_array_equal(val.x, again_val.x)
    np.testing.assert_array_equal(train.x, again_train.x)
    if fraction:
        assert not np.array_equal(split_train_val(data, fraction, seed=4)[1].x, val.x)


def test_a_node_holds_out_its_fraction_of_its_partition():
    def sizes(fraction):
        cfg = parse_run_config({**default_run_config(), "client-test-fraction": fraction})
        train, val, _ = node_data(cfg, NODE)
        return len(train), len(val)

    (all_train, none), (train, val) = sizes(0.0), sizes(0.25)
    assert none == 0 and val == int(all_train * 0.25) and train + val == all_train


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_fraction_outside_zero_to_one_is_refused(bad):
    with pytest.raises(ConfigError, match="'client-test-fraction' = "):
        parse_run_config({**default_run_config(), "client-test-fraction": bad})


def test_zero_trains_on_every_example_and_sends_no_client_evaluation(tmp_path):
    overrides = {"model": "logreg", "num-server-rounds": 2, "local-epochs": 1,
                 "fraction-evaluate": 1.0, "client-test-fraction": 0.0, "output-dir": str(tmp_path)}
    rounds = simulate(overrides, num_nodes=3).results["rounds"]
    cfg = parse_run_config({**default_run_config(), **overrides})
    total = sum(len(node_data(cfg, (("num-partitions", 3), ("partition-id", p)))[0]) for p in range(3))
    for entry in rounds:
        assert entry["train_num_examples"] == total and entry["failed"] == 0
        assert entry["eval_bytes_down"] == 0 and not any(k.startswith("client_") for k in entry)
        assert np.isfinite(entry["accuracy"])
