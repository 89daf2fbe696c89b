"""FedAvg (and FedAvgM), and the server step FedPA shares with it.

Every client reply becomes a delta, one array per model tensor: FedAvg's theta_last - theta,
or FedPA's Sigma_hat^-1 (mu_hat - theta). The server takes the example-weighted mean Delta_bar
and hands g = -Delta_bar to SGD with momentum in PyTorch's form, b <- momentum * b + g,
theta <- theta - lr * b. With lr 1 and momentum 0 this is plain FedAvg; a server learning rate
or momentum makes it FedAvgM. A round whose mean is non-finite, or that has no weight at all,
leaves the state unchanged. The run config may replace the weighted mean by a robust combiner,
cap one reply's weight or clip each delta's norm first (`strategies/robust.py`).

The math functions are pure: they return new arrays and never write into their arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid

from strategies.base import FederatedStrategy, weighted_metrics
from task import records
from strategies.robust import adapt_clip_norm, cap_weights, clip_update, combiner
from task.config import RunConfig
from task.params import decode_array, flatten, numpy_to_record, split_flat

Arrays = list[np.ndarray]


def weighted_mean(
    deltas: Iterable[Sequence[np.ndarray]], weights: Sequence[float]
) -> Arrays | None:
    """Example-weighted mean of client deltas, tensor by tensor; None when the weights sum to 0.

    Clients with weight 0 are left out rather than multiplied by 0, because 0 * NaN is NaN.
    Sums run in float64; each result array has the dtype of the clients' array. `deltas` is read
    once, one client at a time: a generator keeps the working memory at one client's delta.
    """
    weights = list(weights)
    if hasattr(deltas, "__len__") and len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    if any(not (np.isfinite(weight) and weight >= 0) for weight in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    totals: list[np.ndarray] | None = None
    like: list[np.ndarray] = []
    total_weight, count = 0, 0
    for delta, weight in zip(deltas, weights):
        count += 1
        if not weight > 0:
            continue
        weight = float(weight)
        if totals is None:
            like = [np.asarray(array) for array in delta]
            totals = [np.zeros(np.shape(array), dtype=np.float64) for array in like]
        elif len(delta) != len(totals):
            raise ValueError("clients sent different numbers of arrays")
        for index, (total, array) in enumerate(zip(totals, delta)):
            if np.shape(array) != total.shape:
                raise ValueError(f"clients sent array {index} in different shapes")
            total += weight * np.asarray(array, dtype=np.float64)
        total_weight += weight
    if count != len(weights):
        raise ValueError(f"{count} deltas but {len(weights)} weights")
    if totals is None:
        return None
    return [(total / total_weight).astype(ref.dtype) for total, ref in zip(totals, like)]


def server_sgd_step(
    params: Sequence[np.ndarray],
    mean_delta: Sequence[np.ndarray],
    momentum_buffer: Sequence[np.ndarray] | None,
    lr: float,
    momentum: float,
) -> tuple[Arrays, Arrays]:
    """One SGD-with-momentum step on the pseudo-gradient g = -mean_delta.

    PyTorch's form: b <- momentum * b + g (b = g when there is no buffer yet),
    theta <- theta - lr * b. Returns (new_params, new_buffer), each in the dtype of params.
    """
    if len(params) != len(mean_delta) or (
        momentum_buffer is not None and len(momentum_buffer) != len(params)
    ):
        raise ValueError("params, mean_delta and momentum_buffer must hold the same tensors")
    new_params = []
    new_buffer = []
    for index, param in enumerate(params):
        if np.shape(mean_delta[index]) != param.shape or (
            momentum_buffer is not None and np.shape(momentum_buffer[index]) != param.shape
        ):
            raise ValueError(f"tensor {index}: mean_delta or momentum_buffer shape != {param.shape}")
        gradient = -np.asarray(mean_delta[index], dtype=param.dtype)
        if momentum_buffer is None:
            buffer = gradient
        else:
            buffer = momentum * momentum_buffer[index] + gradient
        new_params.append(param - lr * buffer)
        new_buffer.append(buffer)
    return new_params, new_buffer


class RoundOutcome(NamedTuple):
    params: Arrays
    momentum_buffer: Arrays | None
    skipped: bool


def aggregate_round(
    params: Sequence[np.ndarray],
    deltas: Iterable[Sequence[np.ndarray]],
    weights: Sequence[float],
    momentum_buffer: Sequence[np.ndarray] | None,
    lr: float,
    momentum: float,
    combine: Callable[..., Arrays | None] = weighted_mean,
) -> RoundOutcome:
    """Average the client deltas by example weight and take one server step.

    `combine(deltas, weights)` replaces the weighted mean by a robust combiner
    (`strategies.robust.robust_combine`); it returns None when no reply has weight.

    When the weights sum to 0, or the mean or the stepped params or buffer hold any NaN or Inf
    (overflow included), the round is skipped: the returned params and buffer are the ones
    passed in, and `skipped` is True.
    """
    unchanged = RoundOutcome(
        params=list(params),
        momentum_buffer=None if momentum_buffer is None else list(momentum_buffer),
        skipped=True,
    )
    mean_delta = combine(deltas, weights)
    if mean_delta is None or not all(np.isfinite(array).all() for array in mean_delta):
        return unchanged
    new_params, new_buffer = server_sgd_step(params, mean_delta, momentum_buffer, lr, momentum)
    if not all(np.isfinite(array).all() for array in (*new_params, *new_buffer)):
        return unchanged
    return RoundOutcome(params=new_params, momentum_buffer=new_buffer, skipped=False)


class FedAvg(FederatedStrategy):
    """Clients train from the global weights and send theirs back with their example count."""

    def __init__(self, cfg: RunConfig, initial_arrays: ArrayRecord) -> None:
        super().__init__(cfg, initial_arrays)
        self.keys = list(initial_arrays.keys())
        self.params: Arrays = [decode_array(initial_arrays[k]) for k in self.keys]
        self.momentum_buffer: Arrays | None = None
        self.clip_norm = cfg.clip_norm  # changes every round when adaptive
        self.combine = (
            weighted_mean
            if cfg.aggregation == "mean"
            else combiner(cfg.aggregation, cfg.trim_fraction, cfg.krum_byzantine)
        )

    def state_dict(self):
        arrays, meta = super().state_dict()
        arrays |= {f"params/{i}": p for i, p in enumerate(self.params)}
        for i, b in enumerate(self.momentum_buffer or []):
            arrays[f"momentum/{i}"] = b
        return arrays, meta | {"clip_norm": self.clip_norm}

    def load_state_dict(self, arrays, meta) -> None:
        super().load_state_dict(arrays, meta)
        self.clip_norm = meta.get("clip_norm", self.cfg.clip_norm)
        self.params = [arrays[f"params/{i}"] for i in range(len(self.keys))]
        self.momentum_buffer = (
            [arrays[f"momentum/{i}"] for i in range(len(self.keys))] if "momentum/0" in arrays else None
        )

    def client_delta(self, arrays: ArrayRecord) -> Arrays:
        """A FedAvg client sends its weights; its delta is their displacement."""
        return [decode_array(arrays[k]) - p for k, p in zip(self.keys, self.params)]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self.sample_nodes(grid, self.cfg.fraction_train, self.cfg.min_train_nodes)
        contents = self.train_contents(
            server_round,
            {records.ARRAYS: flatten([decode_array(arrays[k]) for k in self.keys])},
            {n: self.round_config(server_round, config) for n in nodes},
        )
        # The weights as the nodes decoded them: their deltas are displacements from these.
        self.params = split_flat(self.sent[records.ARRAYS], [self.shapes[k] for k in self.keys])
        self.params = [p.astype(self.dtypes[k]) for k, p in zip(self.keys, self.params)]
        return self.messages(contents, MessageType.TRAIN, server_round)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self.check_replies(replies, {records.ARRAYS: self.shapes})
        if len(valid) < self.cfg.min_train_nodes:
            return self.skip_round(
                f"{len(valid)} usable repl(ies), min-train-nodes is {self.cfg.min_train_nodes}"
            )
        metrics = [r.content.metric_records[records.METRICS] for r in valid]
        weights = [m[records.NUM_EXAMPLES] for m in metrics]
        if self.cfg.max_client_weight < 1:
            weights = cap_weights(weights, self.cfg.max_client_weight)
        # A generator: one client's delta at a time, so with `mean` memory does not grow with K.
        deltas = (self.client_delta(r.content.array_records[records.ARRAYS]) for r in valid)
        clipped: list[bool] = []
        if self.clip_norm > 0:
            deltas = self._clipped(deltas, clipped)
        outcome = aggregate_round(
            self.params,
            deltas,
            weights,
            self.momentum_buffer,
            self.cfg.server_lr,
            self.cfg.server_momentum,
            combine=self.combine,
        )
        if outcome.skipped:
            return self.skip_round("the averaged update is not finite")
        self.params, self.momentum_buffer = outcome.params, outcome.momentum_buffer
        train_metrics = weighted_metrics(metrics)
        if self.clip_norm > 0 and train_metrics is not None:
            train_metrics["clip-norm"] = self.clip_norm
            train_metrics["clipped-updates"] = sum(clipped)
        if self.cfg.clip_norm_adaptive:
            unclipped = 1.0 - sum(clipped) / len(clipped)
            self.clip_norm = adapt_clip_norm(self.clip_norm, unclipped, self.cfg.clip_norm_quantile)
        return numpy_to_record(dict(zip(self.keys, self.params))), train_metrics

    def _clipped(self, deltas: Iterable[Arrays], clipped: list[bool]) -> Iterable[Arrays]:
        """Each delta cut to `clip_norm`; appends to `clipped` whether it was."""
        for delta in deltas:
            delta, cut = clip_update(delta, self.clip_norm)
            clipped.append(cut)
            yield delta
