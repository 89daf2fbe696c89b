"""Data sources and federated partitions.

Offline sources (`digits`, `synthetic`, `mnist1d`) are built as a local `datasets.Dataset` and split with
flwr-datasets partitioners; any other `dataset` name goes to flwr-datasets' `FederatedDataset`
(a Hugging Face id such as `mnist`, or a local folder of data files): the server keeps its
`test` split (carved from `train` when there is none) and the partitioner (by label, or by an
id column with `natural-id`) spreads its `train` split over the clients. A node with its own
data sets `data-path` in its node config (a `.npz` with arrays `x`, `y`, or a `save_to_disk`
folder).
Everything is deterministic given the run config's `seed`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from task.config import ConfigError, RunConfig
from task.files import save_npz

# `datasets` and `flwr_datasets` are imported where they are used: together they take seconds
# to import (pyarrow, pandas, and seaborn and scipy through flwr_datasets' plots), which a
# deployment pays for every message, as each one starts a fresh ClientApp process; a node that
# trains on its own .npz file needs neither.
if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import Partitioner
    from flwr_datasets.preprocessor import Divider

LABEL_COLUMNS = ("label", "labels", "fine_label", "character", "y")
INPUT_COLUMNS = ("x", "image", "img", "pixels", "features")
OFFLINE_SOURCES = ("digits", "synthetic", "mnist1d")
SYNTHETIC_DEVICES = 30  # generator "devices" in the FedProx Synthetic(alpha, beta) recipe
SYNTHETIC_DIM, SYNTHETIC_CLASSES = 60, 10
MNIST1D_LENGTH, MNIST1D_CLASSES = 40, 10


@dataclass(frozen=True)
class ArrayData:
    """Inputs `x` (float32, N x input_shape) and integer labels `y` (int64, N)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ConfigError(f"data has {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


@dataclass(frozen=True)
class DataSpec:
    """What a model must accept: the same on the server and on every node."""

    input_shape: tuple[int, ...]
    num_classes: int


# What the offline sources' models see: digits are 8x8 grey images, Synthetic has 60 features,
# MNIST-1D signals of length 40.
OFFLINE_SPECS = {
    "digits": DataSpec((1, 8, 8), 10),
    "synthetic": DataSpec((SYNTHETIC_DIM,), SYNTHETIC_CLASSES),
    "mnist1d": DataSpec((MNIST1D_LENGTH,), MNIST1D_CLASSES),
}


# ----------------------------------------------------------------------------- offline sources


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x, bunch.target.astype(np.int64)


def synthetic_fedprox(
    alpha: float, beta: float, seed: int, devices: int = SYNTHETIC_DEVICES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FedProx's Synthetic(alpha, beta): per-device softmax-regression data (x, y, device).

    alpha shifts each device's model, beta each device's input mean. As published, the alpha
    shift is common to all classes and so leaves the labels unchanged: label heterogeneity
    comes from beta (and from the partitioner).
    """
    rng = np.random.default_rng(seed)
    sizes = (rng.lognormal(4, 2, devices).astype(int) + 50).clip(max=1000)
    cov = np.diag(np.arange(1, SYNTHETIC_DIM + 1, dtype=np.float64) ** -1.2)
    xs, ys, ids = [], [], []
    for device, size in enumerate(sizes):
        u, b_shift = rng.normal(0, np.sqrt(alpha)), rng.normal(0, np.sqrt(beta))
        w = rng.normal(u, 1, (SYNTHETIC_DIM, SYNTHETIC_CLASSES))
        b = rng.normal(u, 1, SYNTHETIC_CLASSES)
        v = rng.normal(b_shift, 1, SYNTHETIC_DIM)
        x = rng.multivariate_normal(v, cov, size)
        xs.append(x.astype(np.float32))
        ys.append(np.argmax(x @ w + b, axis=1))
        ids.append(np.full(size, device))
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64), np.concatenate(ids)


@contextmanager
def _global_rngs_kept() -> Iterator[None]:
    """Run a block that seeds or draws from Python's and numpy's global generators, then put
    both back as they were: a library's seeding must not change what the caller draws next."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@lru_cache(maxsize=4)
def mnist1d(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-1D (Greydanus, "Scaling down deep learning", 2020): `num_samples` signals of
    length 40 (num_samples // 10 per class), generated with the `mnist1d` package's own recipe
    from the digit templates it builds in code; its download path is never used.

    The package's train/test split is undone: the app carves its own (`test-fraction`). The
    generator seeds the global `random` and `np.random`; they are restored afterwards.
    """
    from mnist1d.data import get_dataset_args, get_templates, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    with _global_rngs_kept():
        made = make_dataset(args, get_templates())
    x = np.concatenate([made["x"], made["x_test"]]).astype(np.float32)
    y = np.concatenate([made["y"], made["y_test"]]).astype(np.int64)
    x.flags.writeable = y.flags.writeable = False  # shared by every caller through the cache
    return x, y


def _offline_arrays(cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    if cfg.dataset == "digits":
        return _digits()
    if cfg.dataset == "mnist1d":
        return mnist1d(cfg.mnist1d_samples, cfg.seed)
    x, y, _ = synthetic_fedprox(cfg.synthetic_alpha, cfg.synthetic_beta, cfg.seed)
    return x, y


@lru_cache(maxsize=4)
def _offline_split(cfg: RunConfig) -> tuple[ArrayData, ArrayData]:
    """The training pool the clients' partitions come from, and the set the server evaluates
    on: the test set, or with `server-val-fraction` a validation split carved from the pool
    (the test set then stays unseen, by the clients and by whoever tunes on the results)."""
    from sklearn.model_selection import train_test_split

    if cfg.partitioner == "natural-id":
        raise ConfigError(
            f"partitioner 'natural-id' needs a data set with an id column; '{cfg.dataset}' has none"
        )
    x, y = _offline_arrays(cfg)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=cfg.test_fraction, random_state=cfg.seed, stratify=y
    )
    if cfg.server_val_fraction > 0:
        x_train, x_test, y_train, y_test = train_test_split(
            x_train, y_train, test_size=cfg.server_val_fraction, random_state=cfg.seed,
            stratify=y_train,
        )
    return ArrayData(x_train, y_train), ArrayData(x_test, y_test)


# ----------------------------------------------------------------------------- partitioners


def build_partitioner(cfg: RunConfig, num_partitions: int, label: str = "label") -> Partitioner:
    """The partitioner named by `cfg.partitioner`; the skewed ones split by the column `label`."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    if cfg.partitioner == "natural-id":
        return NaturalIdPartitioner(partition_by=cfg.partition_by)
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions)
    if cfg.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions,
            partition_by=label,
            alpha=cfg.dirichlet_alpha,
            min_partition_size=2,
            self_balancing=False,
            seed=cfg.seed,
        )
    return PathologicalPartitioner(
        num_partitions,
        partition_by=label,
        num_classes_per_partition=cfg.classes_per_client,
        class_assignment_mode="first-deterministic",
        seed=cfg.seed,
    )


@lru_cache(maxsize=4)
def _offline_partitioner(cfg: RunConfig, num_partitions: int) -> Partitioner:
    """A partitioner over the pool's labels; each row carries its index into the pool.

    The inputs stay out of the `datasets.Dataset`: turning them into Arrow rows and back costs
    more than partitioning, and the partitioners read only the labels.
    """
    from datasets import Dataset

    pool, _ = _offline_split(cfg)
    partitioner = build_partitioner(cfg, num_partitions)
    rows = Dataset.from_dict({"row": np.arange(len(pool)), "label": pool.y})
    # IidPartitioner has no seed of its own: shuffle the pool with ours first.
    partitioner.dataset = rows.shuffle(seed=cfg.seed)
    return partitioner


@lru_cache(maxsize=4)
def _federated_dataset(cfg: RunConfig, num_partitions: int) -> FederatedDataset:
    """The named data set with its train split partitioned by its own label column (`label`,
    or e.g. CIFAR-100's `fine_label`: the first of LABEL_COLUMNS it has).

    A data set without a `test` split (e.g. FEMNIST) gets one carved from `train`: after
    FederatedDataset's seeded shuffle, the last `test-fraction` of the rows. Every process builds
    the same split from the same seed, so the server's test rows are in no client's partition.
    """
    from flwr_datasets import FederatedDataset

    def federated(
        partitioner: Partitioner | int, preprocessor: Divider | None = None
    ) -> FederatedDataset:
        return FederatedDataset(
            dataset=cfg.dataset, preprocessor=preprocessor, partitioners={"train": partitioner},
            seed=cfg.seed,
        )

    probe = federated(1)
    train = probe.load_split("train")
    label = _label_column(train.column_names)
    if cfg.partitioner == "natural-id" and cfg.partition_by not in train.column_names:
        raise ConfigError(
            f"partition-by '{cfg.partition_by}' is not a column of '{cfg.dataset}' "
            f"(columns: {train.column_names})"
        )
    preprocessor = None if _has_split(probe, "test") else _test_carver(cfg, len(train))
    return federated(build_partitioner(cfg, num_partitions, label), preprocessor)


def _has_split(fds: FederatedDataset, split: str) -> bool:
    try:
        fds.load_split(split)
    except (KeyError, ValueError):
        return False
    return True


def _test_carver(cfg: RunConfig, rows: int) -> Divider:
    """A Divider that keeps ceil(test-fraction * rows) rows of `train` as the `test` split.

    Counts, not fractions: the Divider rounds each fraction down and drops the remainder.
    """
    from flwr_datasets.preprocessor import Divider

    if rows < 2:
        raise ConfigError(f"dataset '{cfg.dataset}' has {rows} training row(s) and no 'test' split")
    test = min(max(int(np.ceil(cfg.test_fraction * rows)), 1), rows - 1)
    return Divider({"train": rows - test, "test": test}, divide_split="train")


def _label_column(columns: list[str]) -> str:
    label = next((c for c in LABEL_COLUMNS if c in columns), None)
    if label is None:
        raise ConfigError(f"data set columns {columns} have no label column (one of {LABEL_COLUMNS})")
    return label


# ----------------------------------------------------------------------------- public API


def server_test_set(cfg: RunConfig) -> ArrayData:
    """The held-out set the server evaluates the global model on: the test set, or the
    validation split with `server-val-fraction`."""
    if cfg.dataset in OFFLINE_SOURCES:
        return _offline_split(cfg)[1]
    return dataset_to_arrays(_federated_dataset(cfg, 1).load_split("test"))


def data_spec(cfg: RunConfig) -> DataSpec:
    if cfg.dataset in OFFLINE_SPECS:  # known without generating the data
        return OFFLINE_SPECS[cfg.dataset]
    test = server_test_set(cfg)
    return DataSpec(test.input_shape, _num_classes(cfg, test))


def _num_classes(cfg: RunConfig, test: ArrayData) -> int:
    names = class_names(cfg)
    return len(names) if names is not None else int(test.y.max()) + 1


def class_names(cfg: RunConfig) -> list[str] | None:
    """The label names of a data set whose label column is a ClassLabel, else None."""
    if cfg.dataset in OFFLINE_SOURCES:
        return None
    from datasets import ClassLabel

    features = _federated_dataset(cfg, 1).load_split("test").features
    label = features[_label_column(list(features))]
    return list(label.names) if isinstance(label, ClassLabel) else None


def partition(cfg: RunConfig, partition_id: int, num_partitions: int) -> ArrayData:
    """Partition `partition_id` of `num_partitions` of the training pool."""
    _check_partition_id(partition_id, num_partitions)
    if cfg.dataset in OFFLINE_SOURCES:
        part = _offline_partitioner(cfg, num_partitions).load_partition(partition_id)
        rows = np.asarray(part["row"], dtype=np.int64)
        pool, _ = _offline_split(cfg)
        return ArrayData(pool.x[rows], pool.y[rows])
    fds = _federated_dataset(cfg, num_partitions)
    if cfg.partitioner == "natural-id":
        partitioner = fds.partitioners["train"]
        if not partitioner.is_dataset_assigned():
            partitioner.dataset = fds.load_split("train")
        if partitioner.num_partitions != num_partitions:
            raise ConfigError(
                f"partitioner 'natural-id': the training rows of '{cfg.dataset}' have "
                f"{partitioner.num_partitions} distinct '{cfg.partition_by}' values, so "
                f"num-partitions must be {partitioner.num_partitions}, not {num_partitions}"
            )
    return dataset_to_arrays(fds.load_partition(partition_id, "train"))


def check_partitions(cfg: RunConfig, spec: DataSpec, num_partitions: int) -> None:
    """ConfigError, before round 1, if the partitioner cannot give each of `num_partitions`
    nodes some data: otherwise every node fails every round and the run ends with all rounds
    skipped. The class count is checked for any data set; an offline pool is split here
    (a fraction of a second) to see every partition's size. With no node connected yet (a
    deployment starting), only the class count is checked.
    """
    if cfg.partitioner == "pathological" and cfg.classes_per_client > spec.num_classes:
        raise ConfigError(
            f"run config: classes-per-client = {cfg.classes_per_client} but '{cfg.dataset}' has "
            f"{spec.num_classes} classes"
        )
    if cfg.dataset not in OFFLINE_SOURCES or num_partitions < 1:
        return
    import warnings

    pool, _ = _offline_split(cfg)
    where = f"partitioner '{cfg.partitioner}' over {num_partitions} nodes ({len(pool)} training rows)"
    if num_partitions > len(pool):
        raise ConfigError(f"run config: {where} leaves partitions empty: more nodes than rows")
    if cfg.partitioner == "iid":  # sizes differ by at most one: none is empty
        return
    # Dirichlet splits every partition at the first load, each of min_partition_size rows or
    # more, or raises; pathological can leave one empty: its sizes are all looked at.
    ids = range(num_partitions) if cfg.partitioner == "pathological" else range(1)
    try:
        with warnings.catch_warnings():  # the partitioner warns on each failed attempt
            warnings.simplefilter("ignore")
            partitioner = _offline_partitioner(cfg, num_partitions)
            sizes = [len(partitioner.load_partition(i)) for i in ids]
    except ValueError as err:
        _offline_partitioner.cache_clear()
        raise ConfigError(f"run config: {where} fails: {' '.join(str(err).split())}") from None
    if empty := [i for i, size in enumerate(sizes) if size == 0]:
        raise ConfigError(f"run config: {where} leaves partition(s) {empty[:10]} empty")


def _check_partition_id(partition_id: int, num_partitions: int) -> None:
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"node config: partition-id {partition_id} is outside 0..{num_partitions - 1}"
        )


def load_local_data(path: str | Path) -> ArrayData:
    """A node's own data: a `.npz` with arrays `x`, `y`, or a `datasets.save_to_disk` folder."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"node config: data-path '{path}' does not exist")
    if path.is_file():
        if path.suffix != ".npz":
            raise ConfigError(f"node config: data-path '{path}' is a file but not a .npz")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in ("x", "y") if name in npz.files}
        except Exception as err:  # corrupt files fail in zipfile, zlib, numpy's header parser...
            raise ConfigError(f"data-path '{path}' is not a readable .npz: {err}") from err
        missing = {"x", "y"} - set(arrays)
        if missing:
            raise ConfigError(f"data-path '{path}' lacks array(s) {sorted(missing)}")
        return _all_finite(_as_array_data(arrays["x"], arrays["y"]), path)
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data-path '{path}' is not a datasets.save_to_disk folder") from err
    if isinstance(loaded, DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return _all_finite(dataset_to_arrays(loaded), path)


def _all_finite(data: ArrayData, path: Path) -> ArrayData:
    """The data, if its inputs are all finite: a NaN input would make the node's model
    non-finite and its replies be rejected for that, blaming the model, not the file."""
    bad = int(data.x.size - np.count_nonzero(np.isfinite(data.x)))
    if bad:
        rows = int((~np.isfinite(data.x.reshape(len(data), -1))).any(axis=1).sum())
        raise ConfigError(
            f"data-path '{path}': {bad} input value(s) in {rows} row(s) are NaN or infinite"
        )
    return data


def node_train_data(
    cfg: RunConfig, node_config: dict[str, Any], cache_dir: Path | None = None
) -> ArrayData:
    """The data a node trains on: its `data-path`, else its partition of the named data set.

    With a `cache_dir`, a partition of an offline source is kept there as a .npz and read back
    by later processes: a deployment starts a fresh process for every message, which would
    otherwise import the data libraries and partition the pool again each time.
    """
    if "data-path" in node_config:
        return load_local_data(str(node_config["data-path"]))
    try:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as err:
        raise ConfigError(
            f"node config needs 'data-path', or 'partition-id' and 'num-partitions' (missing {err})"
        ) from None
    except (TypeError, ValueError):
        raise ConfigError(
            "node config: partition-id and num-partitions must be integers, got "
            f"{node_config['partition-id']!r} and {node_config['num-partitions']!r}"
        ) from None
    if cache_dir is None or cfg.dataset not in OFFLINE_SOURCES:
        return partition(cfg, pid, n)
    _check_partition_id(pid, n)
    path = Path(cache_dir) / f"{_partition_key(cfg, pid, n)}.npz"
    try:
        with np.load(path, allow_pickle=False) as npz:
            return ArrayData(npz["x"], npz["y"])
    except Exception:  # absent, or unreadable (a crash mid-write cannot leave one: writes are atomic)
        data = partition(cfg, pid, n)
    save_npz(path, {"x": data.x, "y": data.y})
    return data


# Every run-config key that decides an offline partition's content.
PARTITION_KEYS = (
    "dataset", "synthetic-alpha", "synthetic-beta", "test-fraction", "partitioner",
    "dirichlet-alpha", "classes-per-client", "partition-by", "seed", "mnist1d-samples",
    "server-val-fraction",
)


def _partition_key(cfg: RunConfig, partition_id: int, num_partitions: int) -> str:
    config = cfg.to_dict()
    settings = {k: config[k] for k in PARTITION_KEYS}
    settings |= {"partition-id": partition_id, "num-partitions": num_partitions}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def split_train_val(data: ArrayData, val_fraction: float, seed: int) -> tuple[ArrayData, ArrayData]:
    """A local validation split for client-side evaluation (empty when the data is tiny)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    n_val = int(len(data) * val_fraction) if len(data) >= 5 else 0
    val, train = order[:n_val], order[n_val:]
    return ArrayData(data.x[train], data.y[train]), ArrayData(data.x[val], data.y[val])


def check_fits(data: ArrayData, spec: DataSpec, where: str) -> None:
    if data.input_shape != spec.input_shape and int(np.prod(data.input_shape)) != int(
        np.prod(spec.input_shape)
    ):
        raise ConfigError(
            f"{where}: inputs have shape {data.input_shape} but the model expects {spec.input_shape}"
        )
    if len(data) and (data.y.min() < 0 or data.y.max() >= spec.num_classes):
        raise ConfigError(
            f"{where}: labels span {data.y.min()}..{data.y.max()} but the model has "
            f"{spec.num_classes} classes"
        )


# ----------------------------------------------------------------------------- conversion


def dataset_to_arrays(ds: Dataset) -> ArrayData:
    label = next((c for c in LABEL_COLUMNS if c in ds.column_names), None)
    inputs = next((c for c in INPUT_COLUMNS if c in ds.column_names), None)
    if label is None or inputs is None:
        raise ConfigError(
            f"data set columns {ds.column_names} need an input column (one of {INPUT_COLUMNS}) "
            f"and a label column (one of {LABEL_COLUMNS})"
        )
    columns = ds.with_format("numpy", columns=[inputs, label])[:]  # one batch conversion
    return _as_array_data(np.asarray(columns[inputs]), np.asarray(columns[label]))


# How raw inputs become model inputs; a run records it (model.json) so prediction repeats it.
PREPROCESSING = {
    "uint8-divisor": 255.0,  # uint8 pixels are divided by it: [0, 255] -> [0, 1]
    "layout": "channels-first",  # N x H x W gains a channel axis; N x H x W x C (C 1 or 3) moves C
}


def model_inputs(x: np.ndarray, uint8_divisor: float = PREPROCESSING["uint8-divisor"]) -> np.ndarray:
    """Raw inputs as the models take them: float32, uint8 pixels scaled, images channels-first."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(uint8_divisor)
    x = x.astype(np.float32)
    if x.ndim == 3:  # grey images N x H x W
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # N x H x W x C
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def _as_array_data(x: np.ndarray, y: np.ndarray) -> ArrayData:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"labels must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
    return ArrayData(model_inputs(x), y.astype(np.int64))
