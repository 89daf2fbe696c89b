"""Plumbing shared by this project's strategies: node sampling, reply checks, evaluation rounds.

A strategy subclass only packs and unpacks records, keeps server state and calls its method's
pure math; everything that is the same for every method lives here.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from task import records
from task.compression import (
    DOWNLINK, EVALUATE, UPLINK, link_codec, pack, payload_seed, payloads, shifts, unpack,
)
from task.config import RunConfig
from task.params import decode_array, flatten, numpy_to_record, record_to_numpy, unflatten


INT64_MAX = 2**63 - 1
DROPPED_METRICS = "dropped-metrics"  # how many client metric values were not finite numbers


class NotEnoughNodes(RuntimeError):
    """Fewer nodes connected than the run needs, for longer than the round timeout."""


@dataclass
class RoundLog:
    """What a strategy tells the round loop about the replies of one training round."""

    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    skipped: bool = False
    reasons: list[str] = field(default_factory=list)


class FederatedStrategy(Strategy):
    """Base class: subclasses implement `configure_train` and `aggregate_train`."""

    def __init__(self, cfg: RunConfig, initial_arrays: ArrayRecord) -> None:
        self.cfg = cfg
        self.shapes = {k: tuple(initial_arrays[k].shape) for k in initial_arrays.keys()}
        self.dtypes = {k: np.dtype(initial_arrays[k].dtype) for k in initial_arrays.keys()}
        self.rng = random.Random(cfg.seed)
        self.last_round = RoundLog()
        self.last_evaluate = RoundLog()
        self.like = record_to_numpy(initial_arrays)
        self.size = sum(a.size for a in self.like.values())
        self.uplink, self.downlink = link_codec(cfg, UPLINK), link_codec(cfg, DOWNLINK)
        # The global as the nodes decoded it in the last round sent (flat, float64): the uplink
        # references and the next downlink's; and the nodes known to hold it (they replied).
        self.sent: dict[str, np.ndarray] = {}
        self.sent_round = 0
        self.holders: set[int] = set()

    # ------------------------------------------------------------------ sampling and messages

    def sample_nodes(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """`max(ceil(fraction * connected), minimum)` nodes, waiting up to the round timeout."""
        deadline = time.monotonic() + self.cfg.round_timeout
        while len(nodes := sorted(grid.get_node_ids())) < minimum:
            if time.monotonic() > deadline:
                raise NotEnoughNodes(
                    f"only {len(nodes)} node(s) connected, the run needs at least {minimum}"
                )
            log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), minimum)
            time.sleep(1.0)
        size = min(len(nodes), max(math.ceil(fraction * len(nodes)), minimum))
        return sorted(self.rng.sample(nodes, size))

    def messages(
        self, contents: Mapping[int, RecordDict], message_type: str, server_round: int
    ) -> list[Message]:
        """One message per node, alive only as long as the round waits for replies.

        Flower's default time-to-live is 12 hours: a node that was down during a round would
        otherwise pull that round's stale message when it comes back, train on an old model
        (and change its client state from it) before it gets to the current round's message.
        """
        return [
            Message(
                content, dst_node_id=node, message_type=message_type, group_id=str(server_round),
                ttl=self.cfg.round_timeout,
            )
            for node, content in contents.items()
        ]

    def train_contents(
        self,
        server_round: int,
        vectors: Mapping[str, np.ndarray],
        configs: Mapping[int, ConfigRecord],
    ) -> dict[int, RecordDict]:
        """One RecordDict per node (the keys of `configs`) carrying the flat `vectors` (by record
        name) in the downlink codec; `self.sent` then holds them as every node decodes them.

        With `codec-reference = "shift"` the nodes that replied last round hold its global and
        get the difference to it; the others (and everyone in a first round) get the decoded
        global itself in the model's dtype, so all nodes start from the same values. A
        compressed message says so, and names its reference round, in DOWNLINK_REFERENCE.
        """
        codec, table = self.downlink, payloads(self.cfg.strategy, DOWNLINK)
        shift = shifts(self.cfg, codec)
        packed: dict[str, Any] = {}
        sent = {}
        for name, vector in vectors.items():
            if codec.name == "fp32" or (shift and not self.sent):
                sent[name] = vector
                continue
            reference = self.sent[name] if shift and table[name].shifted else None
            packed[name], sent[name] = self.pack_global(server_round, DOWNLINK, name, vector, reference)
        with np.errstate(over="ignore"):  # a value beyond float32: the receivers' checks say so
            sent = {name: unflatten(vector, self.like) for name, vector in sent.items()}
        dense = {name: numpy_to_record(arrays) for name, arrays in sent.items()}
        compressed_to = (self.holders if shift else set(configs)) if packed else set()
        contents = {}
        for node, config in configs.items():
            arrays = dense
            if node in compressed_to:
                arrays = packed
                config[records.DOWNLINK_REFERENCE] = self.sent_round if shift else 0
            contents[node] = RecordDict({**arrays, records.CONFIG: config})
        self.sent = {name: flatten(arrays).astype(np.float64) for name, arrays in sent.items()}
        self.sent_round, self.holders = server_round, set()
        return contents

    def pack_global(
        self, server_round: int, purpose: str, name: str, vector: np.ndarray,
        reference: np.ndarray | None,
    ) -> tuple[ArrayRecord, np.ndarray]:
        """(the record carrying the flat `vector` of record `name` in the downlink codec, the
        vector as the nodes decode it); q8's rounding is seeded per run, round, `purpose`
        (a train or an evaluate message) and record."""
        seed = payload_seed(self.cfg.seed, server_round, purpose, name)
        payload = payloads(self.cfg.strategy, DOWNLINK)[name]
        record, decoded, _ = pack(vector, reference, payload, self.downlink, seed)
        return record, decoded

    def evaluate_arrays(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord:
        """The global `arrays` as an evaluate message carries them: in the downlink codec, which
        `config` then names with DOWNLINK_REFERENCE 0, a difference to nothing (a node sampled
        for evaluation need not hold the shift's reference). fp32 sends them as they are, and
        so does top-k, which only carries differences to a reference."""
        if self.downlink.name == "fp32" or self.downlink.drops_values:
            return arrays
        config[records.DOWNLINK_REFERENCE] = 0
        vector = flatten([decode_array(arrays[key]) for key in self.like]).astype(np.float64)
        return self.pack_global(server_round, EVALUATE, records.ARRAYS, vector, None)[0]

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        out = ConfigRecord(dict(config))
        out[records.SERVER_ROUND] = server_round
        return out

    # ------------------------------------------------------------------ reply checks

    def check_replies(
        self,
        replies: Iterable[Message],
        expected_arrays: Mapping[str, Mapping[str, tuple]],
        positive: Iterable[str] = (),
    ) -> list[Message]:
        """The replies fit to aggregate; the others are logged and counted in `last_round`.

        `expected_arrays` maps each ArrayRecord name to the shapes its arrays must have; every
        array must also have the model's dtype for its key, and the records named in `positive`
        (precisions) must be strictly positive.
        """
        positive = set(positive)
        log_ = RoundLog()
        valid = []
        seen: set[int] = set()
        for reply in replies:
            if not reply.has_error():  # it saved the global it was sent (a downlink reference)
                self.holders.add(reply.metadata.src_node_id)
            reason = self._unpack(reply, expected_arrays)
            if reason is None:
                reason = self._problem(reply, expected_arrays, positive, self.dtypes)
            if reply.metadata.src_node_id in seen:  # a duplicate would count one client twice
                reason = "a second reply from this node in the same round"
            seen.add(reply.metadata.src_node_id)
            if reason is None:
                valid.append(reply)
                continue
            if reply.has_error():
                log_.failed += 1
            else:
                log_.rejected += 1
            log_.reasons.append(f"node {reply.metadata.src_node_id}: {reason}")
            log(WARNING, "Reply from node %s not used: %s", reply.metadata.src_node_id, reason)
        log_.accepted = len(valid)
        self.last_round = log_
        return valid

    def _unpack(self, reply: Message, expected: Mapping[str, Any]) -> str | None:
        """Replace a reply's compressed records by the model's arrays they stand for; why one
        cannot be decoded (checked before decoding allocates), or None."""
        if self.uplink.name == "fp32" or reply.has_error():
            return None
        table = payloads(self.cfg.strategy, UPLINK)
        content = reply.content
        for name in expected:
            if name not in table or name not in content.array_records:
                continue  # a missing record: `_problem` names it
            payload = table[name]
            reference = self.sent[name] if shifts(self.cfg, self.uplink) and payload.shifted else None
            try:
                vector = unpack(content.array_records[name], reference, payload, self.uplink, self.size)
            except ValueError as error:
                return f"'{name}' payload rejected: {error}"
            with np.errstate(over="ignore"):  # a value beyond float32: `_problem` rejects it
                content[name] = numpy_to_record(unflatten(vector, self.like))
        return None

    @staticmethod
    def _problem(
        reply: Message,
        expected: Mapping[str, Mapping[str, tuple]],
        positive: set[str],
        dtypes: Mapping[str, np.dtype],
    ) -> str | None:
        if reply.has_error():
            return f"client error: {reply.error.reason}"
        content = reply.content
        for name, shapes in expected.items():
            if name not in content.array_records:
                return f"missing ArrayRecord '{name}'"
            record = content.array_records[name]
            if set(record.keys()) != set(shapes):
                return f"ArrayRecord '{name}' has keys {sorted(record.keys())}, expected {sorted(shapes)}"
            for key, shape in shapes.items():
                try:
                    array = decode_array(record[key])
                except ValueError as error:
                    return f"'{name}/{key}' cannot be decoded: {error}"
                if tuple(array.shape) != tuple(shape):
                    return f"'{name}/{key}' has shape {array.shape}, expected {shape}"
                if not np.issubdtype(array.dtype, np.floating):
                    return f"'{name}/{key}' has dtype {array.dtype}, expected a float type"
                if key in dtypes and array.dtype != dtypes[key]:
                    return f"'{name}/{key}' has dtype {array.dtype}, the model's is {dtypes[key]}"
                if not np.isfinite(array).all():
                    return f"'{name}/{key}' has non-finite values"
                if name in positive and not (array > 0).all():
                    return f"'{name}/{key}' has values <= 0 (a precision must be positive)"
        metrics = content.metric_records.get(records.METRICS)
        if metrics is None or records.NUM_EXAMPLES not in metrics:
            return f"missing MetricRecord '{records.METRICS}' with '{records.NUM_EXAMPLES}'"
        return _count_problem(metrics)

    def skip_round(self, reason: str) -> tuple[None, None]:
        self.last_round.skipped = True
        self.last_round.reasons.append(reason)
        log(WARNING, "Round skipped, global state unchanged: %s", reason)
        return None, None

    # ------------------------------------------------------------------ evaluation rounds

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.cfg.fraction_evaluate == 0 or self.cfg.client_test_fraction == 0:
            return []  # no client-side evaluation asked for, or no client holds data out for it
        nodes = self.sample_nodes(grid, self.cfg.fraction_evaluate, 1)
        config = self.round_config(server_round, config)
        content = RecordDict(
            {records.ARRAYS: self.evaluate_arrays(server_round, arrays, config), records.CONFIG: config}
        )
        return self.messages({n: content for n in nodes}, MessageType.EVALUATE, server_round)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The example-weighted client metrics; replies that cannot be weighted are logged
        and counted in `last_evaluate`, as `check_replies` does for training replies."""
        log_ = RoundLog()
        usable = []
        for reply in replies:
            if reply.has_error():
                reason, log_.failed = f"client error: {reply.error.reason}", log_.failed + 1
            else:
                metrics = reply.content.metric_records.get(records.METRICS)
                reason = (
                    f"missing MetricRecord '{records.METRICS}' with '{records.NUM_EXAMPLES}'"
                    if metrics is None or records.NUM_EXAMPLES not in metrics
                    else _count_problem(metrics)
                )
                if reason is None:
                    usable.append(metrics)
                    continue
                log_.rejected += 1
            log_.reasons.append(f"node {reply.metadata.src_node_id}: {reason}")
            log(WARNING, "Evaluate reply from node %s not used: %s", reply.metadata.src_node_id, reason)
        log_.accepted = len(usable)
        self.last_evaluate = log_
        return weighted_metrics(usable, log_.reasons)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """What a checkpoint needs to continue the run: arrays, and JSON-able metadata."""
        version, internal, gauss = self.rng.getstate()
        return {}, {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        version, internal, gauss = meta["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def posterior(self) -> tuple[ArrayRecord, ArrayRecord] | None:
        """The global Gaussian (mean, precision) for strategies that keep one, else None."""
        return None

    def summary(self) -> None:
        log(INFO, "%s with %s", type(self).__name__, self.cfg.to_dict())


def _count_problem(metrics: MetricRecord) -> str | None:
    count = metrics[records.NUM_EXAMPLES]
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        return f"'{records.NUM_EXAMPLES}' = {count!r} is not a positive integer"
    if count > INT64_MAX:  # more than Flower's wire format carries; as a float weight it overflows
        return f"'{records.NUM_EXAMPLES}' = {count} is larger than {INT64_MAX}"
    return None


def weighted_metrics(
    metrics: list[MetricRecord], problems: list[str] | None = None
) -> MetricRecord | None:
    """Example-weighted mean of every scalar metric (the weight key itself is summed).

    A value that is not a finite number (NaN, inf, a list) is dropped with a logged reason
    (appended to `problems` when given); the mean of that key is then over the others, and
    `dropped-metrics` counts the values dropped.
    """
    usable = [m for m in metrics if records.NUM_EXAMPLES in m and _count_problem(m) is None]
    if not usable:
        return None
    total = sum(int(m[records.NUM_EXAMPLES]) for m in usable)
    out = MetricRecord({records.NUM_EXAMPLES: total})
    keys = set.intersection(*(set(m.keys()) for m in usable)) - {records.NUM_EXAMPLES}
    dropped = 0
    for key in sorted(keys):
        values = [(m[key], m[records.NUM_EXAMPLES]) for m in usable]
        finite = [(v, n) for v, n in values if _is_finite_number(v)]
        for value, _ in values:
            if not _is_finite_number(value):
                dropped += 1
                reason = f"client metric '{key}' = {value!r} dropped: not a finite number"
                log(WARNING, "%s", reason)
                if problems is not None:
                    problems.append(reason)
        weight = sum(n for _, n in finite)
        # Weights as shares: v * n could overflow where v * (n / weight) does not.
        mean = sum(float(v) * (n / weight) for v, n in finite) if finite else math.nan
        if math.isfinite(mean):
            out[key] = mean
        elif finite:
            dropped += 1
            reason = f"client metric '{key}': the weighted mean is not finite, dropped"
            log(WARNING, "%s", reason)
            if problems is not None:
                problems.append(reason)
    if dropped:
        out[DROPPED_METRICS] = dropped
    return out


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) <= INT64_MAX if isinstance(value, int) else math.isfinite(value)
