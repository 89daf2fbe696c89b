"""What a client method gets for one round: config, the server's records, node state and data."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from client_app.compression import received_arrays
from client_app.state import STATE_DIR_KEY, ClientState
from torch import nn

from task import records
from task.config import RunConfig
from task.data import ArrayData, DataSpec, check_fits, data_spec, node_train_data, split_train_val
from task.models import build_model, resolve_device
from task.params import load_arrays

PARTITION_CACHE = "partitions"  # in a node's state-dir: its partitions of offline data sets


@dataclass
class ClientRound:
    cfg: RunConfig
    content: RecordDict  # the server's message
    state: ClientState  # the node's lasting state for this run
    train: ArrayData
    spec: DataSpec
    device: torch.device
    seed: int  # distinct per node and round, fixed by the run's seed
    # Arrays the codecs keep to the next round (client_app/compression.py); the train
    # handler adds them to the node's state.
    codec_state: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def config(self) -> ConfigRecord:
        return self.content.config_records[records.CONFIG]

    @property
    def server_round(self) -> int:
        return int(self.config[records.SERVER_ROUND])

    @cached_property
    def received(self) -> dict[str, dict[str, np.ndarray]]:
        """The message's ArrayRecords as NumPy arrays, decoded once (decoding costs per call)."""
        model = _process_model(self.cfg, self.spec, self.device)
        like = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        return received_arrays(self, like)

    def model_at(self, arrays_name: str = records.ARRAYS) -> nn.Module:
        """The shared model architecture holding the server's arrays, on this node's device.

        The module is this process's one module for the run's architecture (`_process_model`),
        so it is valid until the next call, in this message's handler only.
        """
        model = _process_model(self.cfg, self.spec, self.device)
        load_arrays(model, self.received[arrays_name])
        return model


@lru_cache(maxsize=8)
def _process_model(cfg: RunConfig, spec: DataSpec, device: torch.device) -> nn.Module:
    """One module per process and run, refilled for every message: building a fresh one costs
    more than the rest of a small model's message (a handler runs one message at a time)."""
    return build_model(cfg, spec).to(device)


# Large enough that a simulation process serving many nodes keeps every node's data.
@lru_cache(maxsize=1024)
def node_data(cfg: RunConfig, node_items: tuple) -> tuple[ArrayData, ArrayData, DataSpec]:
    """(train, validation, spec) for a node, cached for the life of the process."""
    spec = data_spec(cfg)
    node_config = dict(node_items)
    state_dir = node_config.get(STATE_DIR_KEY)
    cache = Path(str(state_dir)) / PARTITION_CACHE if state_dir else None
    data = node_train_data(cfg, node_config, cache)
    check_fits(data, spec, f"node data ({dict(node_items)})")
    if data.input_shape != spec.input_shape:
        data = ArrayData(data.x.reshape((len(data),) + spec.input_shape), data.y)
    train, val = split_train_val(data, cfg.client_test_fraction, cfg.seed)
    return train, val, spec


def node_seed(cfg: RunConfig, node_config: dict, node_id: int, server_round: int) -> int:
    who = int(node_config.get("partition-id", node_id % 1_000_003))
    return (cfg.seed * 1_000_003 + who * 10_007 + server_round) % (2**31 - 1)


def device_for(cfg: RunConfig) -> torch.device:
    return resolve_device(cfg.device)
