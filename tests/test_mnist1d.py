"""MNIST-1D (`dataset = "mnist1d"`): the generator, its partitions, the 1-D CNN, and a short
federation that learns. Generated offline from the `mnist1d` package's templates."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from task import data as D
from task.config import ConfigError, parse_run_config
from task.models import build_model

MNIST1D = {"dataset": "mnist1d", "model": "cnn1d"}


def _fresh(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generated now, past the cache (which other tests keep filled)."""
    return D.mnist1d.__wrapped__(num_samples, seed)


# ----------------------------------------------------------------------------- the generator


def test_shapes_classes_and_balance():
    x, y = D.mnist1d(5000, 0)
    assert x.shape == (5000, D.MNIST1D_LENGTH) and x.dtype == np.float32
    assert y.dtype == np.int64
    assert Counter(y.tolist()) == {c: 500 for c in range(10)}
    assert np.isfinite(x).all()
    # The package centres the data set and scales it to unit standard deviation.
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3


def test_deterministic_per_seed_and_different_across_seeds():
    x0, y0 = _fresh(1000, 3)
    x1, y1 = _fresh(1000, 3)
    assert np.array_equal(x0, x1) and np.array_equal(y0, y1)
    x2, _ = _fresh(1000, 4)
    assert not np.allclose(x0, x2)


def test_generation_leaves_the_global_generators_alone():
    np.random.seed(123)
    random.seed(456)
    expected_np, expected_py = np.random.random(3), [random.random() for _ in range(3)]
    np.random.seed(123)
    random.seed(456)
    _fresh(200, 7)  # seeds and draws from both global generators inside
    assert np.array_equal(np.random.random(3), expected_np)
    assert [random.random() for _ in range(3)] == expected_py


def test_global_generators_are_restored_when_generation_fails(monkeypatch):
    import mnist1d.data

    def fails(args, templates):
        np.random.seed(0)
        random.seed(0)
        raise RuntimeError("generator failed")

    monkeypatch.setattr(mnist1d.data, "make_dataset", fails)
    np.random.seed(9)
    random.seed(9)
    expected_np, expected_py = np.random.get_state()[1].copy(), random.getstate()
    with pytest.raises(RuntimeError, match="generator failed"):
        _fresh(100, 1)
    assert np.array_equal(np.random.get_state()[1], expected_np)
    assert random.getstate() == expected_py


def test_generated_once_per_size_and_seed(monkeypatch):
    import mnist1d.data

    calls = []
    real = mnist1d.data.make_dataset
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda *a: calls.append(a) or real(*a))
    first = D.mnist1d(300, 1)
    assert D.mnist1d(300, 1) is first
    D.mnist1d(400, 1)
    D.mnist1d(300, 2)
    assert len(calls) == 3
    assert not first[0].flags.writeable  # shared through the cache: nobody may change it


# ----------------------------------------------------------------------------- through the run config


def test_run_config_test_set_spec_and_partitions():
    cfg = parse_run_config({**MNIST1D, "mnist1d-samples": 2000, "partitioner": "pathological",
                            "classes-per-client": 2, "seed": 1})
    test = D.server_test_set(cfg)
    assert D.data_spec(cfg) == D.DataSpec((40,), 10)
    assert test.x.shape == (400, 40) and len(set(test.y.tolist())) == 10
    parts = [D.partition(cfg, i, 10) for i in range(10)]
    assert sum(len(p) for p in parts) == 1600
    assert all(len(set(p.y.tolist())) <= 2 for p in parts)
    rows = {r.tobytes() for p in parts for r in p.x}
    assert len(rows) == 1600 and rows.isdisjoint(r.tobytes() for r in test.x)


def test_samples_key_is_validated():
    with pytest.raises(ConfigError, match="mnist1d-samples"):
        parse_run_config({"dataset": "mnist1d", "mnist1d-samples": 1005})
    with pytest.raises(ConfigError, match="mnist1d-samples"):
        parse_run_config({"dataset": "mnist1d", "mnist1d-samples": 10})


@pytest.mark.parametrize(
    "model, dataset, fits",
    [("cnn", "mnist1d", "'cnn1d' or 'logreg' or 'mlp'"),
     ("cnn1d", "digits", "'logreg' or 'mlp' or 'cnn'"),
     ("cnn", "synthetic", "'cnn1d' or 'logreg' or 'mlp'")],
)
def test_model_that_cannot_take_the_inputs_is_refused_in_one_line(model, dataset, fits):
    with pytest.raises(ConfigError) as err:
        parse_run_config({"model": model, "dataset": dataset})
    message = str(err.value)
    assert "\n" not in message
    assert f"model '{model}' needs" in message and f"dataset '{dataset}'" in message
    assert sorted(fits.split(" or ")) == sorted(message.split("use model ")[1].split(" or "))


def test_models_that_flatten_take_mnist1d():
    for model in ("logreg", "mlp", "cnn1d"):
        cfg = parse_run_config({"dataset": "mnist1d", "model": model})
        assert build_model(cfg, D.data_spec(cfg))(torch.zeros(3, 40)).shape == (3, 10)


# ----------------------------------------------------------------------------- the 1-D CNN


def test_cnn1d_is_the_reference_size():
    cfg = parse_run_config(MNIST1D)
    model = build_model(cfg, D.data_spec(cfg))
    convs = [m for m in model if isinstance(m, torch.nn.Conv1d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (25, 5, 2), (25, 3, 2), (25, 3, 2)]
    assert sum(p.numel() for p in model.parameters()) == 5210  # as the mnist1d repo's ConvBase
    assert not list(model.buffers())


def test_cnn1d_takes_flat_and_channel_inputs():
    spec = D.DataSpec((2, 40), 10)
    model = build_model(parse_run_config({"model": "cnn1d", "dataset": "synthetic"}), spec)
    assert model(torch.zeros(4, 2, 40)).shape == (4, 10)
    assert model(torch.zeros(4, 80)).shape == (4, 10)
    with pytest.raises(ConfigError, match="cnn1d.*shape \\(1, 8, 8\\)"):
        build_model(parse_run_config({"model": "cnn1d", "dataset": "synthetic"}),
                    D.DataSpec((1, 8, 8), 10))


def test_centralized_fits_are_well_above_chance():
    """A quick centralized check of the data and the CNN (reference, many more steps: logistic
    regression ~32%, CNN ~94%)."""
    from sklearn.linear_model import LogisticRegression

    cfg = parse_run_config({**MNIST1D, "seed": 0})
    pool, _ = D._offline_split(cfg)
    test = D.server_test_set(cfg)
    linear = LogisticRegression(max_iter=300).fit(pool.x, pool.y).score(test.x, test.y)
    assert linear > 0.2  # chance: 0.1

    model = build_model(cfg, D.data_spec(cfg))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(pool.x), torch.from_numpy(pool.y)
    generator = torch.Generator().manual_seed(0)
    for _ in range(15):
        for batch in torch.randperm(len(y), generator=generator).split(100):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(test.x)).argmax(1).numpy() == test.y).mean()
    assert accuracy > 0.7 and accuracy > linear + 0.3, (accuracy, linear)


# ----------------------------------------------------------------------------- nodes and federation


def test_a_node_holds_an_mnist1d_partition_as_its_own_npz(tmp_path):
    """A deployment node trains on an exported MNIST-1D partition given as `data-path`."""
    from client_app.app import train
    from task import records
    from task.files import save_npz
    from task.params import model_to_record

    run_config = {**parse_run_config({}).to_dict(), **MNIST1D, "local-epochs": 1}
    cfg = parse_run_config(run_config)
    part = D.partition(cfg, 3, 10)
    path = tmp_path / "site.npz"
    save_npz(path, {"x": part.x, "y": part.y})
    held = D.node_train_data(cfg, {"data-path": str(path)})
    assert np.array_equal(held.x, part.x) and np.array_equal(held.y, part.y)
    D.check_fits(held, D.data_spec(cfg), "node")

    arrays = model_to_record(build_model(cfg, D.data_spec(cfg)))
    content = RecordDict({records.ARRAYS: arrays,
                          records.CONFIG: ConfigRecord({records.SERVER_ROUND: 1})})
    context = Context(run_id=1, node_id=7, node_config={"data-path": str(path)},
                      state=RecordDict(), run_config=run_config)
    reply = train(Message(content, dst_node_id=7, message_type=MessageType.TRAIN), context)
    assert not reply.has_error()
    assert reply.content.metric_records[records.METRICS][records.NUM_EXAMPLES] == len(part) - int(
        len(part) * cfg.client_test_fraction)


def test_partition_cache_keys_on_the_sample_count(tmp_path):
    node = {"partition-id": 0, "num-partitions": 4}
    for samples in (1000, 2000):
        cfg = parse_run_config({**MNIST1D, "mnist1d-samples": samples})
        assert len(D.node_train_data(cfg, node, tmp_path)) == len(D.partition(cfg, 0, 4))
    assert len(list(tmp_path.iterdir())) == 2


def test_a_short_federation_on_mnist1d_learns(tmp_path):
    from benchmarks.inprocess import simulate

    outputs = simulate(
        {**MNIST1D, "strategy": "fedavg", "partitioner": "dirichlet", "dirichlet-alpha": 0.5,
         "num-server-rounds": 6, "local-epochs": 2, "lr": 0.05, "fraction-evaluate": 0.0,
         "output-dir": str(tmp_path / "run")},
        num_nodes=5,
    )
    accuracy = [r["accuracy"] for r in outputs.results["rounds"]]
    assert accuracy[-1] > 0.35 and accuracy[-1] > accuracy[0], accuracy  # chance: 0.1


# ----------------------------------------------------------------------------- validation split


def test_server_val_fraction_carves_the_pool_and_keeps_the_test_set_unseen():
    base = parse_run_config({**MNIST1D, "mnist1d-samples": 1000})
    tuned = parse_run_config({**MNIST1D, "mnist1d-samples": 1000, "server-val-fraction": 0.25})
    full_pool, test = D._offline_split(base)
    pool, val = D._offline_split(tuned)
    assert D.server_test_set(tuned) is val
    assert (len(pool), len(val)) == (600, 200) and len(set(val.y.tolist())) == 10
    rows = lambda a: {r.tobytes() for r in a.x}  # noqa: E731
    assert rows(pool) | rows(val) == rows(full_pool)
    assert rows(pool).isdisjoint(rows(val))
    assert rows(test).isdisjoint(rows(val) | rows(pool))
    parts = [D.partition(tuned, i, 4) for i in range(4)]
    assert set().union(*(rows(p) for p in parts)) == rows(pool)


def test_server_val_fraction_needs_an_offline_data_set():
    with pytest.raises(ConfigError, match="server-val-fraction"):
        parse_run_config({"dataset": "mnist", "model": "mlp", "server-val-fraction": 0.1})
