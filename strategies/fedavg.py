"""FedAvg (and FedAvgM): the example-weighted average of client models, with an optional
server learning rate and momentum applied to the average's displacement."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from strategies import records
from strategies.base import FederatedStrategy, weighted_metrics
from task.params import numpy_to_record, record_to_numpy

Arrays = dict[str, np.ndarray]


def weighted_average(arrays: Sequence[Arrays], weights: Sequence[float]) -> Arrays | None:
    """sum_i w_i a_i / sum_i w_i per key, in float64; None when the weights sum to zero."""
    total = float(sum(weights))
    if not arrays or total <= 0:
        return None
    return {
        key: sum(w * a[key].astype(np.float64) for a, w in zip(arrays, weights)) / total
        for key in arrays[0]
    }


def server_sgd_step(
    params: Arrays, mean_delta: Arrays, buffer: Arrays | None, lr: float, momentum: float
) -> tuple[Arrays, Arrays]:
    """SGD with momentum on the pseudo-gradient g = -mean_delta (PyTorch form).

    b = momentum * b + g;  params = params - lr * b.  With lr 1 and momentum 0 the new params
    are params + mean_delta: plain FedAvg when mean_delta is (average - params).
    """
    new_buffer = {
        k: -mean_delta[k] + (momentum * buffer[k] if buffer is not None else 0.0) for k in params
    }
    new_params = {k: (params[k] - lr * new_buffer[k]).astype(params[k].dtype) for k in params}
    return new_params, new_buffer


class FedAvg(FederatedStrategy):
    """Clients train from the global weights and send theirs back with their example count."""

    def __init__(self, cfg, initial_arrays: ArrayRecord) -> None:
        super().__init__(cfg, initial_arrays)
        self.global_arrays = record_to_numpy(initial_arrays)
        self.momentum_buffer: Arrays | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_arrays = record_to_numpy(arrays)
        nodes = self.sample_nodes(grid, self.cfg.fraction_train, self.cfg.min_train_nodes)
        content = RecordDict(
            {records.ARRAYS: arrays, records.CONFIG: self.round_config(server_round, config)}
        )
        return self.messages({n: content for n in nodes}, MessageType.TRAIN, server_round)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self.check_replies(replies, {records.ARRAYS: self.shapes})
        if len(valid) < self.cfg.min_train_nodes:
            return self.skip_round(
                f"{len(valid)} usable repl(ies), min-train-nodes is {self.cfg.min_train_nodes}"
            )
        metrics = [r.content.metric_records[records.METRICS] for r in valid]
        average = weighted_average(
            [record_to_numpy(r.content.array_records[records.ARRAYS]) for r in valid],
            [m[records.NUM_EXAMPLES] for m in metrics],
        )
        delta = {k: average[k] - self.global_arrays[k] for k in average}
        new_arrays, self.momentum_buffer = server_sgd_step(
            self.global_arrays, delta, self.momentum_buffer, self.cfg.server_lr, self.cfg.server_momentum
        )
        self.global_arrays = new_arrays
        return numpy_to_record(new_arrays), weighted_metrics(metrics)
