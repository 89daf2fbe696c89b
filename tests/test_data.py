"""Data sources and partitions: digits, FedProx synthetic, a local Hugging Face folder, node data.

Everything here runs offline: the Hugging Face path reads a parquet folder written by the test,
with the datasets cache in a temporary folder and every socket connection refused.
"""

from __future__ import annotations

import hashlib
import socket
import zipfile
from collections import Counter

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence, Value
from sklearn.datasets import load_digits

from task import data as D
from task.config import ConfigError, parse_run_config

NUM_PARTITIONS = 10
N_DIGITS = 1797


# ----------------------------------------------------------------------------- helpers


def _clear_caches() -> None:
    D._offline_split.cache_clear()
    D._offline_partitioner.cache_clear()
    D._federated_dataset.cache_clear()


def _fresh_partitions(cfg, n=NUM_PARTITIONS) -> list[D.ArrayData]:
    """Partitions computed from scratch (no lru_cache hit), so determinism is really tested."""
    _clear_caches()
    return [D.partition(cfg, i, n) for i in range(n)]


def _row_keys(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """One hash per example of (input bytes, label)."""
    x = np.ascontiguousarray(x)
    return [
        hashlib.sha1(xi.tobytes() + int(yi).to_bytes(8, "little", signed=True)).digest()
        for xi, yi in zip(x, y, strict=True)
    ]


def _digit_keys(x: np.ndarray, y: np.ndarray) -> list[bytes]:
    """Digits as the raw 0..16 integer pixels sklearn ships (x = pixels / 16 exactly)."""
    pixels = np.rint(np.asarray(x, np.float64) * 16).astype(np.int8).reshape(len(x), 64)
    return _row_keys(pixels, y)


def _label_tv(parts: list[D.ArrayData], num_classes: int) -> float:
    """Mean over partitions of the total-variation distance to the global label histogram."""
    all_y = np.concatenate([p.y for p in parts])
    global_hist = np.bincount(all_y, minlength=num_classes) / len(all_y)
    return float(np.mean([
        0.5 * np.abs(np.bincount(p.y, minlength=num_classes) / len(p) - global_hist).sum()
        for p in parts
    ]))


def _device_label_tv(y: np.ndarray, device: np.ndarray, num_classes: int = 10) -> float:
    global_hist = np.bincount(y, minlength=num_classes) / len(y)
    return float(np.mean([
        0.5 * np.abs(np.bincount(y[device == d], minlength=num_classes) / np.sum(device == d)
                     - global_hist).sum()
        for d in np.unique(device)
    ]))


PARTITIONERS = {
    "iid": {"partitioner": "iid"},
    "dirichlet-0.5": {"partitioner": "dirichlet", "dirichlet-alpha": 0.5},
    "dirichlet-0.1": {"partitioner": "dirichlet", "dirichlet-alpha": 0.1},
    "pathological-2": {"partitioner": "pathological", "classes-per-client": 2},
}


@pytest.fixture(scope="module")
def digits_parts() -> dict[str, list[D.ArrayData]]:
    return {name: _fresh_partitions(parse_run_config(raw)) for name, raw in PARTITIONERS.items()}


@pytest.fixture(scope="module")
def digits_reference() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    return bunch.data / 16.0, bunch.target  # the raw 0..16 pixels, scaled as _digit_keys expects


# ----------------------------------------------------------------------------- digits


def test_digits_server_test_set_and_spec():
    cfg = parse_run_config({})
    test = D.server_test_set(cfg)
    assert test.x.dtype == np.float32 and test.y.dtype == np.int64
    assert test.x.shape == (360, 1, 8, 8)  # ceil(0.2 * 1797)
    assert D.data_spec(cfg) == D.DataSpec((1, 8, 8), 10)
    # stratified: every class is in the test set in proportion (within one example)
    counts = np.bincount(test.y, minlength=10)
    expected = np.bincount(load_digits().target, minlength=10) * 0.2
    assert np.all(np.abs(counts - expected) <= 1)


@pytest.mark.parametrize("name", list(PARTITIONERS))
def test_digits_partitions_are_disjoint_and_complete(name, digits_parts, digits_reference):
    parts = digits_parts[name]
    assert len(parts) == NUM_PARTITIONS
    cfg = parse_run_config(PARTITIONERS[name])
    test = D.server_test_set(cfg)

    for p in parts:
        assert p.x.dtype == np.float32 and p.y.dtype == np.int64
        assert p.x.shape[1:] == (1, 8, 8) and len(p) > 0
        assert np.array_equal(p.x * 16, np.rint(p.x * 16))  # pixels / 16, nothing else

    pool_keys = [k for p in parts for k in _digit_keys(p.x, p.y)]
    test_keys = _digit_keys(test.x, test.y)
    all_keys = _digit_keys(*digits_reference)
    assert len(set(all_keys)) == N_DIGITS  # every digit row is unique, so sets suffice below

    # the partitions do not overlap ...
    seen: set[bytes] = set()
    for p in parts:
        keys = set(_digit_keys(p.x, p.y))
        assert len(keys) == len(p)
        assert not keys & seen
        seen |= keys
    # ... the server's test set is disjoint from the pool, and together they are all digits
    assert not set(test_keys) & set(pool_keys)
    assert len(pool_keys) == N_DIGITS - len(test) == 1437
    assert Counter(pool_keys + test_keys) == Counter(all_keys)


def test_digits_iid_sizes_differ_by_at_most_one(digits_parts):
    sizes = [len(p) for p in digits_parts["iid"]]
    assert sum(sizes) == 1437
    assert max(sizes) - min(sizes) <= 1
    assert sorted(sizes) == [143] * 3 + [144] * 7


def test_digits_pathological_limits_classes_per_partition(digits_parts):
    for p in digits_parts["pathological-2"]:
        assert len(np.unique(p.y)) <= 2


def test_digits_pathological_one_class_per_client():
    parts = _fresh_partitions(parse_run_config({"partitioner": "pathological",
                                                "classes-per-client": 1}))
    assert [len(np.unique(p.y)) for p in parts] == [1] * NUM_PARTITIONS
    # 10 clients, 10 classes, one each ("first-deterministic"): every class is owned once
    assert sorted(int(p.y[0]) for p in parts) == list(range(10))


def test_digits_heterogeneity_is_ordered(digits_parts):
    tv = {name: _label_tv(parts, 10) for name, parts in digits_parts.items()}
    assert tv["dirichlet-0.1"] > tv["dirichlet-0.5"] > tv["iid"]
    assert tv["iid"] < 0.15  # ~144 examples per client: sampling noise only
    assert tv["pathological-2"] > 0.7  # two of ten classes: at least 1 - 2 * max class share


@pytest.mark.parametrize("name", list(PARTITIONERS))
def test_digits_partitions_are_deterministic_per_seed(name, digits_parts):
    again = _fresh_partitions(parse_run_config(PARTITIONERS[name]))
    for first, second in zip(digits_parts[name], again, strict=True):
        assert np.array_equal(first.x, second.x)
        assert np.array_equal(first.y, second.y)


@pytest.mark.parametrize("name", ["iid", "dirichlet-0.5", "dirichlet-0.1"])
def test_digits_other_seed_gives_another_split(name, digits_parts):
    other = _fresh_partitions(parse_run_config({**PARTITIONERS[name], "seed": 1}))
    first_keys = [set(_digit_keys(p.x, p.y)) for p in digits_parts[name]]
    other_keys = [set(_digit_keys(p.x, p.y)) for p in other]
    assert first_keys != other_keys
    if name.startswith("dirichlet"):
        hist = lambda parts: np.stack([np.bincount(p.y, minlength=10) for p in parts])  # noqa: E731
        assert not np.array_equal(hist(digits_parts[name]), hist(other))


def test_partition_id_out_of_range():
    cfg = parse_run_config({"partitioner": "iid"})
    for pid in (NUM_PARTITIONS, -1):
        with pytest.raises(ConfigError) as info:
            D.partition(cfg, pid, NUM_PARTITIONS)
        assert str(info.value) == f"node config: partition-id {pid} is outside 0..9"


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_shape_classes_and_devices():
    x, y, device = D.synthetic_fedprox(1.0, 1.0, seed=0)
    sizes = (np.random.default_rng(0).lognormal(4, 2, 30).astype(int) + 50).clip(max=1000)
    assert x.shape == (int(sizes.sum()), 60) and x.dtype == np.float32
    assert y.shape == (len(x),) and y.dtype == np.int64
    assert set(np.unique(y)) == set(range(10))
    assert np.array_equal(np.bincount(device, minlength=30), sizes)
    assert np.all(np.diff(device) >= 0)  # devices come in blocks


def test_synthetic_is_deterministic_per_seed():
    a, b, c = D.synthetic_fedprox(0.5, 0.5, 7), D.synthetic_fedprox(0.5, 0.5, 7), D.synthetic_fedprox(0.5, 0.5, 8)
    for left, right in zip(a, b, strict=True):
        assert np.array_equal(left, right)
    assert len(a[0]) != len(c[0]) or not np.array_equal(a[0], c[0])


def test_synthetic_heterogeneity_grows_with_alpha_beta():
    for seed in (0, 1):
        x0, y0, d0 = D.synthetic_fedprox(0.0, 0.0, seed)
        x1, y1, d1 = D.synthetic_fedprox(1.0, 1.0, seed)
        assert np.array_equal(np.bincount(d0), np.bincount(d1))  # same device sizes
        assert _device_label_tv(y1, d1) > _device_label_tv(y0, d0)


def test_synthetic_through_the_run_config():
    raw = {"dataset": "synthetic", "partitioner": "iid", "synthetic-alpha": 0.0, "synthetic-beta": 0.0}
    cfg = parse_run_config(raw)
    x, y, _ = D.synthetic_fedprox(0.0, 0.0, 0)
    parts = _fresh_partitions(cfg, 5)
    test = D.server_test_set(cfg)
    assert D.data_spec(cfg) == D.DataSpec((60,), 10)
    assert test.x.shape == (int(np.ceil(0.2 * len(x))), 60)
    assert Counter(k for p in parts for k in _row_keys(p.x, p.y)) + Counter(_row_keys(test.x, test.y)) \
        == Counter(_row_keys(x, y))


# ----------------------------------------------------------------------------- Hugging Face folder


@pytest.fixture
def no_network(monkeypatch):
    def refuse(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"test is offline: refused connection to {address}")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


HF_TRAIN, HF_TEST = 60, 21


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A local stand-in for a hub data set: train/test parquet files, image + ClassLabel(3)."""
    import datasets
    import huggingface_hub.constants

    root = tmp_path_factory.mktemp("hf")
    folder = root / "tiny_mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    features = Features({"image": Image(), "label": ClassLabel(num_classes=3)})
    train_x = rng.integers(0, 256, (HF_TRAIN, 28, 28), dtype=np.uint8)
    train_y = rng.integers(0, 3, HF_TRAIN)
    # the test split only holds classes 0 and 1: num_classes must come from ClassLabel, not max + 1
    test_x = rng.integers(0, 256, (HF_TEST, 28, 28), dtype=np.uint8)
    test_y = np.arange(HF_TEST) % 2
    for split, xs, ys in (("train", train_x, train_y), ("test", test_x, test_y)):
        ds = Dataset.from_dict({"image": list(xs), "label": ys.tolist()}, features=features)
        ds.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "cache")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        _clear_caches()
        yield {"path": str(folder), "train": (train_x, train_y), "test": (test_x, test_y)}
        _clear_caches()


def _uint8_images(x: np.ndarray) -> np.ndarray:
    """Back from float32 in [0, 1] to the uint8 pixels, checking nothing else was done to them."""
    assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
    pixels = np.rint(x * 255).astype(np.uint8)
    np.testing.assert_array_equal(x, pixels.astype(np.float32) / np.float32(255))
    return pixels


def test_hf_folder_server_test_set_and_spec(hf_folder, no_network):
    cfg = parse_run_config({"dataset": hf_folder["path"], "partitioner": "iid"})
    test = D.server_test_set(cfg)
    assert test.x.shape == (HF_TEST, 1, 28, 28)
    pixels = _uint8_images(test.x)
    test_x, test_y = hf_folder["test"]
    assert Counter(_row_keys(pixels[:, 0], test.y)) == Counter(_row_keys(test_x, test_y))
    assert D.data_spec(cfg) == D.DataSpec((1, 28, 28), 3)


@pytest.mark.parametrize("raw", [{"partitioner": "iid"},
                                 {"partitioner": "dirichlet", "dirichlet-alpha": 1.0},
                                 {"partitioner": "pathological", "classes-per-client": 1}],
                         ids=["iid", "dirichlet", "pathological"])
def test_hf_folder_partitions_cover_the_train_split(hf_folder, no_network, raw):
    cfg = parse_run_config({"dataset": hf_folder["path"], **raw})
    n = 3
    parts = [D.partition(cfg, i, n) for i in range(n)]
    keys = []
    for p in parts:
        assert p.x.shape[1:] == (1, 28, 28) and len(p) > 0
        part_keys = _row_keys(_uint8_images(p.x)[:, 0], p.y)
        assert not set(part_keys) & set(keys)
        keys += part_keys
    train_x, train_y = hf_folder["train"]
    assert Counter(keys) == Counter(_row_keys(train_x, train_y))
    if raw["partitioner"] == "pathological":
        assert sorted(int(np.unique(p.y).item()) for p in parts) == [0, 1, 2]
    if raw["partitioner"] == "iid":
        assert sorted(len(p) for p in parts) == [20, 20, 20]
    with pytest.raises(ConfigError, match="partition-id 3 is outside 0..2"):
        D.partition(cfg, n, n)


@pytest.fixture
def hf_fine_label_folder(tmp_path, monkeypatch):
    """CIFAR-100's layout: images under `img`, the class under `fine_label`, and a `coarse_label`."""
    import datasets
    import huggingface_hub.constants

    folder = tmp_path / "tiny_cifar100"
    folder.mkdir()
    rng = np.random.default_rng(1)
    features = Features({
        "img": Image(), "fine_label": ClassLabel(num_classes=4), "coarse_label": ClassLabel(num_classes=2),
    })
    for split, size in (("train", 40), ("test", 12)):
        fine = np.arange(size) % 4
        ds = Dataset.from_dict(
            {"img": list(rng.integers(0, 256, (size, 8, 8, 3), dtype=np.uint8)),
             "fine_label": fine.tolist(), "coarse_label": (fine // 2).tolist()},
            features=features,
        )
        ds.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _clear_caches()
    yield str(folder)
    _clear_caches()


def test_hf_folder_is_partitioned_by_its_own_label_column(hf_fine_label_folder, no_network):
    cfg = parse_run_config(
        {"dataset": hf_fine_label_folder, "partitioner": "pathological", "classes-per-client": 1}
    )
    assert D.data_spec(cfg) == D.DataSpec((3, 8, 8), 4)
    parts = [D.partition(cfg, i, 4) for i in range(4)]
    assert sorted(int(np.unique(p.y).item()) for p in parts) == [0, 1, 2, 3]  # one fine label each
    assert sum(len(p) for p in parts) == 40


# ----------------------------------------------------------------------------- no test split


WRITERS, ROWS_PER_WRITER = 5, 10


@pytest.fixture
def hf_train_only_folder(tmp_path, monkeypatch):
    """FEMNIST's layout: one `train` split, each row tagged with the writer who drew it."""
    import datasets
    import huggingface_hub.constants

    folder = tmp_path / "tiny_femnist"
    folder.mkdir()
    rng = np.random.default_rng(2)
    rows = WRITERS * ROWS_PER_WRITER
    x = rng.integers(0, 256, (rows, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 3, rows)
    writer = [f"f{i // ROWS_PER_WRITER:04d}_07" for i in range(rows)]
    features = Features({"image": Image(), "character": ClassLabel(num_classes=3),
                         "writer_id": Value("string")})
    Dataset.from_dict({"image": list(x), "character": y.tolist(), "writer_id": writer},
                      features=features).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _clear_caches()
    keys = _row_keys(x, y)
    yield {"path": str(folder), "keys": keys, "writer": dict(zip(keys, writer, strict=True))}
    _clear_caches()


def _keys(data: D.ArrayData) -> list[bytes]:
    return _row_keys(_uint8_images(data.x)[:, 0], data.y)


def test_train_only_data_set_gets_a_test_set_outside_every_partition(hf_train_only_folder, no_network):
    source = hf_train_only_folder
    cfg = parse_run_config({"dataset": source["path"], "partitioner": "iid", "test-fraction": 0.25})
    test = D.server_test_set(cfg)
    assert len(test) == 13  # ceil(0.25 * 50)
    assert D.data_spec(cfg) == D.DataSpec((1, 8, 8), 3)
    _clear_caches()  # the clients are other processes: they rebuild the split from the seed
    parts = [D.partition(cfg, i, 3) for i in range(3)]
    part_keys = [k for p in parts for k in _keys(p)]
    assert len(set(part_keys)) == len(part_keys) == 37
    assert not set(part_keys) & set(_keys(test))
    assert Counter(part_keys + _keys(test)) == Counter(source["keys"])
    _clear_caches()
    assert _keys(D.server_test_set(cfg)) == _keys(test)
    _clear_caches()
    other_seed = D.server_test_set(parse_run_config({**cfg.to_dict(), "seed": 1}))
    assert set(_keys(other_seed)) != set(_keys(test))


def test_natural_id_gives_one_partition_per_writer(hf_train_only_folder, no_network):
    source = hf_train_only_folder
    cfg = parse_run_config({"dataset": source["path"], "partitioner": "natural-id",
                            "partition-by": "writer_id", "test-fraction": 0.1})
    test_keys = set(_keys(D.server_test_set(cfg)))
    pool_writers = {source["writer"][k] for k in source["keys"] if k not in test_keys}
    assert len(pool_writers) == WRITERS  # 5 test rows cannot take all 10 rows of a writer
    writers = []
    for pid in range(WRITERS):
        part = D.partition(cfg, pid, WRITERS)
        [writer] = {source["writer"][k] for k in _keys(part)}  # one writer per partition ...
        expected = [k for k in source["keys"] if source["writer"][k] == writer and k not in test_keys]
        assert Counter(_keys(part)) == Counter(expected)  # ... with all of that writer's pool rows
        writers.append(writer)
    assert sorted(writers) == sorted(pool_writers)


def test_natural_id_needs_as_many_partitions_as_ids(hf_train_only_folder, no_network):
    cfg = parse_run_config({"dataset": hf_train_only_folder["path"], "partitioner": "natural-id",
                            "partition-by": "writer_id", "test-fraction": 0.1})
    assert _config_error(D.partition, cfg, 0, 4) == (
        f"partitioner 'natural-id': the training rows of '{cfg.dataset}' have 5 distinct "
        "'writer_id' values, so num-partitions must be 5, not 4")
    missing = parse_run_config({**cfg.to_dict(), "partition-by": "author"})
    message = _config_error(D.partition, missing, 0, 5)
    assert message.startswith(f"partition-by 'author' is not a column of '{cfg.dataset}' (columns: [")


def test_natural_id_needs_a_column_and_a_data_set_with_ids():
    with pytest.raises(ConfigError, match="partitioner 'natural-id' needs 'partition-by'"):
        parse_run_config({"partitioner": "natural-id"})
    cfg = parse_run_config({"partitioner": "natural-id", "partition-by": "writer_id"})
    _clear_caches()
    assert _config_error(D.server_test_set, cfg) == (
        "partitioner 'natural-id' needs a data set with an id column; 'digits' has none")


# ----------------------------------------------------------------------------- a node's own data


def _node(path, **extra):
    return D.node_train_data(parse_run_config({}), {"data-path": str(path), **extra})


@pytest.mark.parametrize("ignored", [{}, {"partition-id": 99, "num-partitions": 2}],
                         ids=["data-path-only", "partition-ids-ignored"])
def test_node_npz_float(tmp_path, ignored):
    rng = np.random.default_rng(1)
    x = rng.random((25, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 25)
    np.savez(tmp_path / "site.npz", x=x, y=y)
    data = _node(tmp_path / "site.npz", **ignored)
    assert data.x.dtype == np.float32 and data.y.dtype == np.int64
    np.testing.assert_array_equal(data.x, x)
    np.testing.assert_array_equal(data.y, y)


@pytest.mark.parametrize("ignored", [{}, {"partition-id": 0, "num-partitions": 10}],
                         ids=["data-path-only", "partition-ids-ignored"])
def test_node_npz_uint8_images(tmp_path, ignored):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 12).astype(np.uint8)
    np.savez(tmp_path / "site.npz", x=x, y=y)
    data = _node(tmp_path / "site.npz", **ignored)
    assert data.x.shape == (12, 1, 28, 28) and data.y.dtype == np.int64
    np.testing.assert_array_equal(_uint8_images(data.x)[:, 0], x)
    np.testing.assert_array_equal(data.y, y.astype(np.int64))


def test_node_npz_channels_last_rgb_becomes_channels_first(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=x, y=np.array([0, 1, 2, 3]))
    data = _node(tmp_path / "rgb.npz")
    assert data.input_shape == (3, 32, 32)
    np.testing.assert_array_equal(_uint8_images(data.x), x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("ignored", [{}, {"partition-id": 5, "num-partitions": 2}],
                         ids=["data-path-only", "partition-ids-ignored"])
def test_node_save_to_disk_x_label(tmp_path, ignored):
    rng = np.random.default_rng(4)
    x = rng.random((15, 64), dtype=np.float32)
    y = rng.integers(0, 10, 15)
    features = Features({"x": Sequence(Value("float32")), "label": Value("int64")})
    Dataset.from_dict({"x": x.tolist(), "label": y.tolist()}, features=features).save_to_disk(
        str(tmp_path / "site"))
    data = _node(tmp_path / "site", **ignored)
    assert data.x.shape == (15, 64) and data.x.dtype == np.float32
    np.testing.assert_array_equal(data.x, x)
    np.testing.assert_array_equal(data.y, y)


def test_node_save_to_disk_image_label(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (9, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 3, 9)
    features = Features({"image": Image(), "label": ClassLabel(num_classes=3)})
    Dataset.from_dict({"image": list(x), "label": y.tolist()}, features=features).save_to_disk(
        str(tmp_path / "site"))
    data = _node(tmp_path / "site", **{"partition-id": 0, "num-partitions": 1})
    assert data.x.shape == (9, 1, 28, 28)
    np.testing.assert_array_equal(_uint8_images(data.x)[:, 0], x)
    np.testing.assert_array_equal(data.y, y)


def test_node_save_to_disk_dataset_dict_uses_train(tmp_path):
    train = Dataset.from_dict({"x": [[1.0, 2.0], [3.0, 4.0]], "label": [0, 1]})
    other = Dataset.from_dict({"x": [[9.0, 9.0]], "label": [2]})
    DatasetDict({"test": other, "train": train}).save_to_disk(str(tmp_path / "site"))
    data = _node(tmp_path / "site")
    np.testing.assert_array_equal(data.x, np.array([[1, 2], [3, 4]], np.float32))
    np.testing.assert_array_equal(data.y, [0, 1])


def test_node_partition_when_no_data_path():
    cfg = parse_run_config({"partitioner": "iid"})
    _clear_caches()
    data = D.node_train_data(cfg, {"partition-id": 3, "num-partitions": NUM_PARTITIONS})
    expected = D.partition(cfg, 3, NUM_PARTITIONS)
    np.testing.assert_array_equal(data.x, expected.x)
    np.testing.assert_array_equal(data.y, expected.y)


# ----------------------------------------------------------------------------- bad node data


def _config_error(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return str(info.value)


def test_missing_data_path(tmp_path):
    path = tmp_path / "nowhere" / "site.npz"
    assert _config_error(_node, path) == f"node config: data-path '{path}' does not exist"


def test_npz_without_y(tmp_path):
    path = tmp_path / "site.npz"
    np.savez(path, x=np.zeros((3, 64), np.float32))
    assert _config_error(_node, path) == f"data-path '{path}' lacks array(s) ['y']"


def test_npz_without_x_and_y(tmp_path):
    path = tmp_path / "site.npz"
    np.savez(path, inputs=np.zeros((3, 64)), labels=np.zeros(3, int))
    assert _config_error(_node, path) == f"data-path '{path}' lacks array(s) ['x', 'y']"


def _valid_npz_bytes(tmp_path, compressed=False) -> bytes:
    rng = np.random.default_rng(6)
    path = tmp_path / "valid.npz"
    (np.savez_compressed if compressed else np.savez)(
        path, x=rng.random((50, 64)), y=rng.integers(0, 10, 50))
    return path.read_bytes()


CORRUPTIONS = {
    "random-bytes": lambda b: np.random.default_rng(7).bytes(2000),
    "zip-magic-then-junk": lambda b: b"PK\x03\x04" + np.random.default_rng(8).bytes(500),
    "truncated": lambda b: b[: len(b) // 2],
    "tail-cut": lambda b: b[:-10],
    "flipped-payload": lambda b: b[:300] + bytes(v ^ 0xFF for v in b[300:320]) + b[320:],
    "flipped-header": lambda b: b[:100] + bytes(v ^ 0xFF for v in b[100:120]) + b[120:],
    "empty": lambda b: b"",
}


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_npz(tmp_path, corruption, compressed):
    path = tmp_path / "site.npz"
    path.write_bytes(CORRUPTIONS[corruption](_valid_npz_bytes(tmp_path, compressed)))
    message = _config_error(_node, path)
    assert message.startswith(f"data-path '{path}' is not a readable .npz: ")


def test_corrupt_npz_is_a_bad_zip_underneath(tmp_path):
    # the case a bare (OSError, ValueError) handler let through as zipfile.BadZipFile
    path = tmp_path / "site.npz"
    path.write_bytes(_valid_npz_bytes(tmp_path)[:-10])
    with pytest.raises(ConfigError) as info:
        _node(path)
    assert isinstance(info.value.__cause__, zipfile.BadZipFile)


def test_non_npz_file(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text("x,y\n1,2\n")
    assert _config_error(_node, path) == f"node config: data-path '{path}' is a file but not a .npz"


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    assert _config_error(_node, tmp_path / "empty") == (
        f"data-path '{tmp_path / 'empty'}' is not a datasets.save_to_disk folder")


def test_saved_dataset_without_usable_columns(tmp_path):
    Dataset.from_dict({"pixels_raw": [1, 2], "target": [0, 1]}).save_to_disk(str(tmp_path / "site"))
    message = _config_error(_node, tmp_path / "site")
    assert message.startswith("data set columns ['pixels_raw', 'target'] need an input column")


def test_npz_float_labels(tmp_path):
    path = tmp_path / "site.npz"
    np.savez(path, x=np.zeros((4, 64), np.float32), y=np.array([0.0, 1.0, 0.5, 2.0]))
    assert _config_error(_node, path) == "labels must be a 1-D integer array, got float64 of shape (4,)"


def test_npz_length_mismatch(tmp_path):
    path = tmp_path / "site.npz"
    np.savez(path, x=np.zeros((4, 64), np.float32), y=np.zeros(3, np.int64))
    assert _config_error(_node, path) == "data has 4 inputs but 3 labels"


@pytest.mark.parametrize(("node_config", "missing"), [
    ({}, "'partition-id'"),
    ({"partition-id": 0}, "'num-partitions'"),
    ({"num-partitions": 10}, "'partition-id'"),
], ids=["empty", "no-num-partitions", "no-partition-id"])
def test_node_config_without_data(node_config, missing):
    message = _config_error(D.node_train_data, parse_run_config({}), node_config)
    assert message == (
        f"node config needs 'data-path', or 'partition-id' and 'num-partitions' (missing {missing})")


def test_node_config_partition_id_not_an_integer():
    message = _config_error(D.node_train_data, parse_run_config({}),
                            {"partition-id": "first", "num-partitions": 10})
    assert message == "node config: partition-id and num-partitions must be integers, got 'first' and 10"


@pytest.mark.parametrize("pid", [10, 11, -1])
def test_node_config_partition_id_out_of_range(pid):
    message = _config_error(D.node_train_data, parse_run_config({"partitioner": "iid"}),
                            {"partition-id": pid, "num-partitions": 10})
    assert message == f"node config: partition-id {pid} is outside 0..9"


# ----------------------------------------------------------------------------- check_fits

DIGITS_SPEC = D.DataSpec((1, 8, 8), 10)


def test_check_fits_accepts_matching_and_flattened_inputs():
    y = np.arange(10)
    assert D.check_fits(D.ArrayData(np.zeros((10, 1, 8, 8), np.float32), y), DIGITS_SPEC, "node 1") is None
    assert D.check_fits(D.ArrayData(np.zeros((10, 64), np.float32), y), DIGITS_SPEC, "node 1") is None
    empty = D.ArrayData(np.zeros((0, 64), np.float32), np.zeros(0, np.int64))
    assert D.check_fits(empty, DIGITS_SPEC, "node 1") is None


def test_check_fits_refuses_another_input_shape(tmp_path):
    rng = np.random.default_rng(9)
    np.savez(tmp_path / "mnist.npz", x=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
             y=np.arange(5))
    data = _node(tmp_path / "mnist.npz")
    message = _config_error(D.check_fits, data, DIGITS_SPEC, "node 7")
    assert message == "node 7: inputs have shape (1, 28, 28) but the model expects (1, 8, 8)"


@pytest.mark.parametrize(("labels", "span"), [([0, 3, 10], "0..10"), ([-1, 2, 9], "-1..9")])
def test_check_fits_refuses_labels_out_of_range(labels, span):
    data = D.ArrayData(np.zeros((3, 64), np.float32), np.array(labels, np.int64))
    message = _config_error(D.check_fits, data, DIGITS_SPEC, "node 2")
    assert message == f"node 2: labels span {span} but the model has 10 classes"


# ----------------------------------------------------------------------------- partition cache


def test_cached_partition_is_the_partition_and_is_read_back(tmp_path, monkeypatch):
    cfg = parse_run_config({"partitioner": "dirichlet", "dirichlet-alpha": 0.3, "seed": 4})
    node = {"partition-id": 2, "num-partitions": 5}
    fresh = D.node_train_data(cfg, node)
    cached = D.node_train_data(cfg, node, tmp_path)
    assert np.array_equal(cached.x, fresh.x) and np.array_equal(cached.y, fresh.y)
    [file] = tmp_path.iterdir()
    monkeypatch.setattr(D, "partition", lambda *a: pytest.fail("partitioned again"))
    again = D.node_train_data(cfg, node, tmp_path)
    assert np.array_equal(again.x, fresh.x) and np.array_equal(again.y, fresh.y)
    assert [p.name for p in tmp_path.iterdir()] == [file.name]


def test_partition_cache_keys_on_every_setting_and_rebuilds_a_bad_file(tmp_path):
    base = {"partitioner": "dirichlet", "dirichlet-alpha": 0.3, "seed": 4}
    node = {"partition-id": 0, "num-partitions": 3}
    for change in ({}, {"seed": 5}, {"dirichlet-alpha": 0.4}, {"test-fraction": 0.3},
                   {"dataset": "synthetic"}, {"partitioner": "iid"}):
        D.node_train_data(parse_run_config(base | change), node, tmp_path)
    D.node_train_data(parse_run_config(base), {"partition-id": 1, "num-partitions": 3}, tmp_path)
    assert len(list(tmp_path.iterdir())) == 7
    cfg = parse_run_config(base)
    path = tmp_path / f"{D._partition_key(cfg, 0, 3)}.npz"
    path.write_bytes(b"not a zip file")
    rebuilt = D.node_train_data(cfg, node, tmp_path)
    assert np.array_equal(rebuilt.y, D.node_train_data(cfg, node).y)
    with np.load(path) as npz:
        assert np.array_equal(npz["y"], rebuilt.y)
    with pytest.raises(ConfigError, match="outside"):
        D.node_train_data(cfg, {"partition-id": 3, "num-partitions": 3}, tmp_path)


# ----------------------------------------------------------------------------- feasibility and finiteness


def test_a_dirichlet_alpha_that_cannot_fill_every_partition_fails_in_one_line():
    cfg = parse_run_config({"dirichlet-alpha": 1e-9})
    message = _config_error(D.check_partitions, cfg, D.data_spec(cfg), 20)
    assert message.startswith("run config: partitioner 'dirichlet' over 20 nodes (1437 training rows) fails: ")
    assert "\n" not in message


def test_more_classes_per_client_than_classes_fails_in_one_line():
    cfg = parse_run_config({"partitioner": "pathological", "classes-per-client": 11})
    assert _config_error(D.check_partitions, cfg, D.data_spec(cfg), 4) == (
        "run config: classes-per-client = 11 but 'digits' has 10 classes")
    # known from the class count alone, before any node connects
    assert "classes-per-client = 11" in _config_error(D.check_partitions, cfg, D.data_spec(cfg), 0)


@pytest.mark.parametrize("partitioner", ["iid", "pathological", "dirichlet"])
def test_more_nodes_than_rows_fail_in_one_line(partitioner):
    cfg = parse_run_config({"partitioner": partitioner})
    assert _config_error(D.check_partitions, cfg, D.data_spec(cfg), 2000) == (
        f"run config: partitioner '{partitioner}' over 2000 nodes (1437 training rows) leaves "
        "partitions empty: more nodes than rows")


def test_feasible_partitions_pass():
    cfg = parse_run_config({})
    D.check_partitions(cfg, D.data_spec(cfg), 10)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_in_node_data_name_the_file(tmp_path, bad):
    path = tmp_path / "site.npz"
    x = np.zeros((4, 64), np.float32)
    x[1, 3] = x[2, 5] = bad
    np.savez(path, x=x, y=np.arange(4))
    assert _config_error(_node, path) == (
        f"data-path '{path}': 2 input value(s) in 2 row(s) are NaN or infinite")


def test_non_finite_inputs_in_a_saved_dataset_name_the_folder(tmp_path):
    path = tmp_path / "site"
    Dataset.from_dict({"x": [[0.0, 1.0], [float("nan"), 0.0]], "label": [0, 1]}).save_to_disk(str(path))
    assert _config_error(_node, path) == (
        f"data-path '{path}': 1 input value(s) in 1 row(s) are NaN or infinite")
