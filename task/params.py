"""Moving model parameters between torch modules, Flower records and flat vectors."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn


def model_to_record(model: nn.Module) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in model.state_dict().items()})


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def load_record(model: nn.Module, record: ArrayRecord) -> None:
    load_arrays(model, record_to_numpy(record))


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy `arrays` (one per state-dict key, no more, no fewer) into the model's parameters."""
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=True)


def flatten(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays.values()]) if arrays else np.zeros(0)


def unflatten(vector: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for key, ref in like.items():
        out[key] = vector[offset : offset + ref.size].reshape(ref.shape).astype(ref.dtype)
        offset += ref.size
    if offset != vector.size:
        raise ValueError(f"vector has {vector.size} entries, the model {offset}")
    return out


def record_bytes(record: ArrayRecord) -> int:
    return int(record.count_bytes())
