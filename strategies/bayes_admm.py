"""BayesADMM (IVON-ADMM) arithmetic on flat diagonal Gaussians (spec sections 3-5).

Every function takes flat vectors, either all torch tensors or all numpy arrays, and returns the
same kind. A posterior is (mean, precision); the duals of client k are (v_k, V_k), and the server
keeps their sums over the whole federation.

Partial participation, the rule of this project (the reference needs all K clients every round):
- The server averages the replies of the clients that took part (any non-empty subset A), unweighted.
- The dual sums run over ALL K clients: a client's duals carry its data's information and persist
  while it is absent. The server adds an increment only for a reply it accepts, and a client commits
  its increment only when its reply was accepted, so both sides always hold the same sums.
- alpha = 1 / (1 + K rho) with K the federation size.
At the fixed point every S_k equals the global, so the average over any A is the global itself and
the fixed point S_g = delta - sum_k V_k (and its mean) does not depend on A. With A = all clients
this is exactly the reference update.

The isotropic variant (fixed unit covariance) needs no code of its own: with every precision 1,
prior precision 1 and zero precision duals, these functions are classic federated ADMM on the means,
whose dual y_k is -v_k.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import NamedTuple

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from strategies.base import FederatedStrategy, weighted_metrics
from task import records
from task.config import RunConfig
from task.params import flatten, numpy_to_record, record_to_numpy, unflatten


def client_dual_increment(
    global_mean, global_precision, client_mean, client_precision, rho: float, damping: float
):
    """(dv, dV) = damping rho (S~ m~ - S_k m_k, S~ - S_k), with (m~, S~) the global the client
    received at the start of the round, not the one that comes out of it."""
    step = damping * rho
    dual_mean_increment = step * (global_precision * global_mean - client_precision * client_mean)
    dual_precision_increment = step * (global_precision - client_precision)
    return dual_mean_increment, dual_precision_increment


@dataclass(frozen=True)
class DualSums:
    """sum_k v_k and sum_k V_k over all clients of the federation."""

    mean: object
    precision: object

    @classmethod
    def zeros_like(cls, vector) -> DualSums:
        xp = _array_module(vector)
        return cls(mean=xp.zeros_like(vector), precision=xp.zeros_like(vector))


def accumulate_duals(sums: DualSums, increments: Sequence[tuple]) -> DualSums:
    """Add the (dv, dV) increments of the accepted replies to the running sums."""
    mean, precision = sums.mean, sums.precision
    for dual_mean_increment, dual_precision_increment in increments:
        mean = mean + dual_mean_increment
        precision = precision + dual_precision_increment
    return DualSums(mean=mean, precision=precision)


class ServerUpdate(NamedTuple):
    mean: object
    precision: object
    # Coordinates where the ADMM precision was not finite and positive, and the precision-weighted
    # average of the participating clients was used instead.
    fallback_coords: int


def server_update(
    client_means: Sequence,
    client_precisions: Sequence,
    dual_mean_sum,
    dual_precision_sum,
    rho: float,
    prior_precision,
    num_clients: int,
) -> ServerUpdate:
    """The new global (spec section 4) from the replies of the participating clients A:

        S_g = (1 - alpha) mean_A(S_k)     + alpha (delta - sum_all V_k)
        m_g = [(1 - alpha) mean_A(S_k m_k) - alpha sum_all v_k] / S_g,   alpha = 1 / (1 + K rho)

    `client_means`/`client_precisions` are the replies of A (see the module docstring for why the
    dual sums run over all K = `num_clients` clients). The prior is N(0, 1/delta), delta =
    `prior_precision` (a scalar or a vector). Where S_g is not finite and strictly positive, or
    m_g is not finite, that coordinate falls back to the precision-weighted average of A, so the
    global is always a valid Gaussian; `fallback_coords` counts them.
    """
    if not client_means or len(client_means) != len(client_precisions):
        raise ValueError("need one precision per client mean, from at least one client")
    vectors = [*client_means, *client_precisions, dual_mean_sum, dual_precision_sum]
    if getattr(prior_precision, "ndim", 0) > 0:
        vectors.append(prior_precision)
    if len({tuple(vector.shape) for vector in vectors}) > 1:
        raise ValueError("client means, precisions, dual sums and prior differ in length")
    if len(client_means) > num_clients:
        raise ValueError(f"{len(client_means)} replies from a federation of {num_clients} clients")
    num_replies = len(client_means)
    average_precision = sum(client_precisions) / num_replies
    average_natural_mean = (
        sum(precision * mean for mean, precision in zip(client_means, client_precisions))
        / num_replies
    )
    return server_update_from_averages(
        average_precision, average_natural_mean, dual_mean_sum, dual_precision_sum, rho,
        prior_precision, num_clients,
    )


def server_update_from_averages(
    average_precision, average_natural_mean, dual_mean_sum, dual_precision_sum, rho: float,
    prior_precision, num_clients: int,
) -> ServerUpdate:
    """`server_update` given mean_A(S_k) and mean_A(S_k m_k), for callers that stream the replies."""
    alpha = 1.0 / (1.0 + num_clients * rho)
    precision = (1.0 - alpha) * average_precision + alpha * (prior_precision - dual_precision_sum)
    natural_mean = (1.0 - alpha) * average_natural_mean - alpha * dual_mean_sum

    xp = _array_module(precision)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # non-finite: fallback
        fallback = ~(xp.isfinite(precision) & (precision > 0) & xp.isfinite(natural_mean / precision))
    precision = xp.where(fallback, average_precision, precision)
    natural_mean = xp.where(fallback, average_natural_mean, natural_mean)
    return ServerUpdate(natural_mean / precision, precision, int(fallback.sum()))


class BoundedReply(NamedTuple):
    mean: object
    precision: object
    # Coordinates where the reply's precision or mean lay outside the bounds and was clipped.
    clipped_coords: int


def bound_reply(
    client_mean,
    client_precision,
    global_mean,
    global_precision,
    ratio_bound: float = 0.0,
    precision_min: float = 0.0,
    precision_max: float = math.inf,
    mean_shift_bound: float = 0.0,
) -> BoundedReply:
    """A reply clipped to what one client may do to the global (m~, S~) it was sent:

        S_k in [S~/c, c S~] (c = `ratio_bound`, 0: off), then in [precision_min, precision_max]
        |m_k - m~| <= b / sqrt(S~) per coordinate (b = `mean_shift_bound`, 0: off)

    With both sides clipped, the dual increment it implies is bounded too:
    |dV| <= gamma rho max(c - 1, 1 - 1/c) S~ and |S_k m_k - S~ m~| <= c S~ (b / sqrt(S~)) + (c - 1) S~ |m~|.
    """
    xp = _array_module(client_precision)
    precision = client_precision
    if ratio_bound > 0:
        precision = xp.minimum(xp.maximum(precision, global_precision / ratio_bound),
                               global_precision * ratio_bound)
    precision = xp.clip(precision, precision_min, precision_max)
    mean = client_mean
    if mean_shift_bound > 0:
        reach = mean_shift_bound / xp.sqrt(global_precision)
        mean = xp.minimum(xp.maximum(mean, global_mean - reach), global_mean + reach)
    clipped = (precision != client_precision) | (mean != client_mean)
    return BoundedReply(mean, precision, int(clipped.sum()))


def multi_krum_keep(client_means, global_precision, byzantine: int) -> list[int]:
    """The replies multi-krum keeps (Blanchard et al. 2017), with distances in units of the
    global's standard deviation (the Mahalanobis distance under the global posterior):

        d(i, j) = sum_p S~_p (m_i,p - m_j,p)^2

    Each of the n replies scores the sum of its n - f - 2 smallest distances to the others
    (f = `byzantine`); the n - f lowest scores are kept, returned in reply order (ties: the
    earlier reply first). Flower's `aggregate_krum` makes the same choice on plain Euclidean
    distances but returns only the weighted average of the kept models, not which they are, and
    BayesADMM needs which: the kept replies are the subset A of the server update and only
    their dual increments are accepted. Needs every mean at once (n x P floats) and n^2 / 2
    distances of P terms.
    """
    n = len(client_means)
    if byzantine < 0 or n < 2 * byzantine + 3:
        raise ValueError(f"multi-krum with f = {byzantine} needs at least {2 * byzantine + 3} "
                         f"replies, got {n}")
    scale = np.sqrt(global_precision)
    scaled = [scale * np.asarray(mean, dtype=np.float64) for mean in client_means]
    distances = np.zeros((n, n))
    with np.errstate(over="ignore"):  # a mean far out is an infinite distance, not an error
        for i in range(n):
            for j in range(i + 1, n):
                distances[i, j] = distances[j, i] = np.sum((scaled[i] - scaled[j]) ** 2)
    closest = max(1, n - byzantine - 2)
    scores = [np.sort(np.delete(distances[i], i))[:closest].sum() for i in range(n)]
    return sorted(np.argsort(scores, kind="stable")[: n - byzantine].tolist())


@dataclass(frozen=True)
class ReplySums:
    """Per coordinate: sum of S_k, of S_k m_k, and how many replies were summed there (numpy;
    one reply added at a time, so memory does not grow with the number of replies)."""

    precision: object = 0.0
    natural_mean: object = 0.0
    count: object = 0

    def add(self, precision, mean, where=None) -> ReplySums:
        """These sums plus one reply (only at the coordinates `where` is true, if given)."""
        natural_mean = precision * mean
        count = 1
        if where is not None:
            precision, natural_mean = np.where(where, precision, 0), np.where(where, natural_mean, 0)
            count = where.astype(np.float64)
        return ReplySums(self.precision + precision, self.natural_mean + natural_mean, self.count + count)


def average_in_bounds(tiers: Sequence[ReplySums]):
    """(mean_A(S_k), mean_A(S_k m_k)) per coordinate over the replies of the first tier that has
    one there. The strategy passes the replies inside every bound, then those whose mean is
    inside the mean-shift bound (their precision clipped), then all replies clipped; the last
    tier always holds every reply.

    A reply out of bounds at a coordinate is thus left out of that coordinate's average instead
    of entering it clipped: a node out of bounds every round (a hostile one) cannot push the
    global by the bound's reach round after round, while an honest reply with a stray coordinate
    still counts everywhere else. The middle tier matters where honest replies are out of the
    precision ratio too (round 1, where the global is the prior): there a hostile mean still
    stays out. Leaving replies out at some coordinates is the update over a smaller subset A
    there, which the rule allows (any non-empty A; see the module docstring).
    """
    precision, natural_mean = tiers[-1].precision / tiers[-1].count, \
        tiers[-1].natural_mean / tiers[-1].count
    for tier in reversed(tiers[:-1]):
        some = np.asarray(tier.count) > 0
        count = np.where(some, tier.count, 1)
        precision = np.where(some, tier.precision / count, precision)
        natural_mean = np.where(some, tier.natural_mean / count, natural_mean)
    return precision, natural_mean


def calibrated_precision(global_precision, dual_precision_sum, prior_precision, share: float):
    """The global precision on the data's scale, for the posterior a user samples from:

        S_post = delta + (S_g - delta + (1 - s) sum_all V_k) / s

    IVON's Hessian average restarts at 0 every round and takes in only the share s = 1 - beta2^T
    of a round's curvature, so a client reports S_k = S~_g + s (c_k + V_k) / rho (c_k: its data's
    curvature N_k E[diag Hessian of l_k] / tau). Where the server update is stationary this gives
    S_g = delta + s sum c_k - (1 - s) sum V_k, and the line above recovers delta + sum c_k, the
    pooled posterior's precision (spec section 8), for any duals. With s = 1 it is S_g itself.
    The ADMM iteration keeps S_g: only the posterior that is sampled or saved is rescaled.
    Where the curvature estimate is negative (IVON's Price estimates are noisy), scaling it up by
    1/s would push the precision below S_g, even below 0: there S_g itself is kept, so the result
    is never less certain than the global and always positive where S_g is.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"curvature share must lie in (0, 1], got {share}")
    xp = _array_module(global_precision)
    scaled = prior_precision + (global_precision - prior_precision + (1.0 - share) * dual_precision_sum) / share
    return xp.maximum(scaled, global_precision)


def cosine_lr(lr0: float, round_index: int, num_rounds: int) -> float:
    """lr0 (1 + cos(pi r / R)) / 2 for round r = 0, ..., R - 1; constant within a round."""
    return lr0 * 0.5 * (1.0 + math.cos(math.pi * round_index / num_rounds))


def _array_module(vector):
    return torch if isinstance(vector, torch.Tensor) else np


class BayesADMM(FederatedStrategy):
    """Keeps the global posterior (m_g, S_g), the dual sums over all clients, and which round of
    each node's replies it used; sends each sampled node the global and its `accepted-round`.

    Checkpoints file the accepted rounds under each node's `client-id` (its partition in
    simulation), not Flower's node id, which a resumed simulation draws afresh; until a node of
    the resumed run has replied, its message carries the whole table and the node finds itself.
    """

    def __init__(self, cfg: RunConfig, initial_arrays: ArrayRecord) -> None:
        super().__init__(cfg, initial_arrays)
        self.initial_weights = initial_arrays
        size = sum(a.size for a in self.like.values())
        # The isotropic variant fixes every covariance to the identity (prior included).
        delta = 1.0 if cfg.posterior == "isotropic" else cfg.prior_precision
        # The prior as the clients receive it (the model's dtype, e.g. float32(0.1) =
        # 0.10000000149), so that both sides compute the same round-1 dual increments.
        self.prior_precision = self.on_the_wire(np.full(size, delta))
        self.mean = np.zeros(size)
        self.precision = self.prior_precision.copy()
        self.at_prior = True
        self.duals = DualSums.zeros_like(self.mean)
        self.accepted_round: dict[int, int] = {}  # node id -> round, this Flower run
        self.client_ids: dict[int, str] = {}  # node id -> client-id, learned from replies
        self.resumed_accepted: dict[str, int] = {}  # client-id -> round, from the checkpoint
        self.num_clients = 0
        self.fallback_coords = 0
        # The mean share of a round's curvature the last accepted replies' IVON averages held.
        self.curvature_share = 1.0

    def on_the_wire(self, vector: np.ndarray) -> np.ndarray:
        """`vector` rounded to the model's dtype per key, as a client decodes it, in float64."""
        return flatten(unflatten(vector, self.like)).astype(np.float64)

    def state_dict(self):
        arrays, meta = super().state_dict()
        accepted = self.accepted_by_client()
        clients = sorted(accepted)
        arrays |= {
            "mean": self.mean,
            "precision": self.precision,
            "dual-mean": self.duals.mean,
            "dual-precision": self.duals.precision,
            "accepted-clients": np.array(clients, dtype=np.str_),
            "accepted-rounds": np.array([accepted[c] for c in clients], dtype=np.int64),
        }
        return arrays, meta | {
            "at_prior": self.at_prior, "num_clients": self.num_clients,
            "curvature_share": self.curvature_share,
        }

    def load_state_dict(self, arrays, meta) -> None:
        super().load_state_dict(arrays, meta)
        self.mean, self.precision = arrays["mean"], arrays["precision"]
        self.duals = DualSums(mean=arrays["dual-mean"], precision=arrays["dual-precision"])
        if "accepted-clients" in arrays:
            clients = [str(c) for c in arrays["accepted-clients"]]
        else:  # checkpoints from before client-ids: Flower node ids
            clients = [f"node-{int(n)}" for n in arrays["accepted-nodes"]]
        self.resumed_accepted = dict(zip(clients, (int(r) for r in arrays["accepted-rounds"])))
        self.accepted_round, self.client_ids = {}, {}
        self.at_prior, self.num_clients = meta["at_prior"], meta["num_clients"]
        self.curvature_share = meta["curvature_share"]

    def accepted_by_client(self) -> dict[str, int]:
        """The last accepted round per client-id, over this run and the runs it resumed."""
        accepted = dict(self.resumed_accepted)
        for node, server_round in self.accepted_round.items():
            accepted[self.client_ids.get(node, f"node-{node}")] = server_round
        return accepted

    def global_records(self) -> tuple[ArrayRecord, ArrayRecord]:
        # While at the prior the clients start from the shared initial weights, not from 0.
        mean = self.initial_weights if self.at_prior else numpy_to_record(unflatten(self.mean, self.like))
        return mean, numpy_to_record(unflatten(self.precision, self.like))

    def posterior(self) -> tuple[ArrayRecord, ArrayRecord] | None:
        """The global posterior with its precision calibrated (`calibrated_precision`); none
        before the first update, nor for the isotropic variant, whose unit covariance is fixed,
        not fitted to the data."""
        if self.at_prior or self.cfg.posterior == "isotropic":
            return None
        precision = calibrated_precision(
            self.precision, self.duals.precision, self.prior_precision, self.curvature_share
        )
        mean, _ = self.global_records()
        return mean, numpy_to_record(unflatten(precision, self.like))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self.sample_nodes(grid, self.cfg.fraction_train, self.cfg.min_train_nodes)
        # K counts every node that has taken part or could: absent nodes keep their duals.
        self.num_clients = max(self.num_clients, len(list(grid.get_node_ids())))
        configs = {}
        for node in nodes:
            node_config = self.round_config(server_round, config)
            node_config[records.AT_PRIOR] = self.at_prior
            if node in self.client_ids or not self.resumed_accepted:
                node_config[records.ACCEPTED_ROUND] = self.accepted_round.get(node, 0)
            else:  # a node this run has not heard from yet: it looks itself up
                accepted = self.accepted_by_client()
                node_config[records.ACCEPTED_CLIENTS] = list(accepted)
                node_config[records.ACCEPTED_ROUNDS] = list(accepted.values())
            configs[node] = node_config
        # While at the prior the clients start from the shared initial weights, not from 0.
        mean = flatten(self.like).astype(np.float64) if self.at_prior else self.mean
        contents = self.train_contents(
            server_round, {records.ARRAYS: mean, records.PRECISION: self.precision}, configs
        )
        # The global as the nodes decoded it: both sides compute the dual increments from it.
        if not self.at_prior:
            self.mean = self.sent[records.ARRAYS]
        self.precision = self.sent[records.PRECISION]
        return self.messages(contents, MessageType.TRAIN, server_round)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self.check_replies(
            replies,
            {records.ARRAYS: self.shapes, records.PRECISION: self.shapes},
            positive=(records.PRECISION,),
        )
        if len(valid) < self.cfg.min_train_nodes:
            return self.skip_round(
                f"{len(valid)} usable repl(ies), min-train-nodes is {self.cfg.min_train_nodes}"
            )
        # One reply at a time (memory does not grow with K), summed in reply order as
        # server_update and accumulate_duals would sum the lists.
        received_mean = np.zeros_like(self.mean) if self.at_prior else self.mean
        duals, tiers = self.duals, [ReplySums(), ReplySums(), ReplySums()]
        clipped_coords, unaccepted = 0, set()  # nodes clipped or left out
        left_out = self.left_out_by_multi_krum(valid)
        for index, reply in enumerate(valid):
            if index in left_out:
                # Out of this round's subset A everywhere, and its increment is counted by
                # neither side (the node is not marked accepted).
                node = reply.metadata.src_node_id
                unaccepted.add(node)
                reason = f"node {node}: left out by multi-krum, dual increment not accepted"
                self.last_round.reasons.append(reason)
                log(WARNING, "Reply %s", reason)
                continue
            arrays = reply.content.array_records
            sent_mean = flatten(record_to_numpy(arrays[records.ARRAYS])).astype(np.float64)
            sent_precision = flatten(record_to_numpy(arrays[records.PRECISION])).astype(np.float64)
            bounded = bound_reply(
                sent_mean,
                sent_precision,
                received_mean,
                self.precision,
                self.cfg.precision_ratio_bound,
                self.cfg.precision_min,
                self.cfg.precision_max,
                self.cfg.mean_shift_bound,
            )
            m, s = bounded.mean, bounded.precision
            if bounded.clipped_coords:
                # The client computed its increment from what it sent, not from the clipped
                # values: neither side keeps this round's increment (the node is not marked
                # accepted, so it drops its pending one).
                node = reply.metadata.src_node_id
                clipped_coords += bounded.clipped_coords
                unaccepted.add(node)
                reason = f"node {node}: {bounded.clipped_coords} coordinate(s) out of bounds " \
                    "left out of the average, dual increment not accepted"
                self.last_round.reasons.append(reason)
                log(WARNING, "Reply %s", reason)
            else:
                increment = client_dual_increment(
                    received_mean, self.precision, m, s, self.cfg.admm_rho, self.cfg.dual_damping
                )
                duals = accumulate_duals(duals, [increment])
                del increment
            mean_inside = m == sent_mean
            tiers = [tiers[0].add(s, m, mean_inside & (s == sent_precision)),
                     tiers[1].add(s, m, mean_inside), tiers[2].add(s, m)]
            del m, s, bounded, sent_mean, sent_precision, mean_inside
        average_precision, average_natural_mean = average_in_bounds(tiers)
        update = server_update_from_averages(
            average_precision, average_natural_mean, duals.mean, duals.precision,
            self.cfg.admm_rho, self.prior_precision, max(self.num_clients, len(valid)),
        )
        # Keep exactly what goes on the wire (the model's dtype), so that the server and the
        # clients compute the same dual increments from the global they share.
        with np.errstate(over="ignore"):
            mean, precision = self.on_the_wire(update.mean), self.on_the_wire(update.precision)
        if not (np.isfinite(mean).all() and np.isfinite(precision).all() and (precision > 0).all()):
            return self.skip_round("the new global does not fit the model's dtype")
        self.mean, self.precision, self.duals = mean, precision, duals
        self.at_prior = False
        self.fallback_coords = update.fallback_coords
        for reply in valid:
            node = reply.metadata.src_node_id
            if node in unaccepted:  # its increment is counted by neither side
                continue
            self.accepted_round[node] = server_round
            config = reply.content.config_records.get(records.CONFIG)
            if config is not None and isinstance(config.get(records.CLIENT_ID), str):
                self.client_ids[node] = config[records.CLIENT_ID]
                # This run's table now holds the client; its entry from the checkpoint is older.
                self.resumed_accepted.pop(self.client_ids[node], None)
        counts = [int(r.content.metric_records[records.METRICS][records.NUM_EXAMPLES]) for r in valid]
        self.curvature_share = float(np.mean([self.cfg.curvature_share(n) for n in counts]))
        metrics = weighted_metrics([r.content.metric_records[records.METRICS] for r in valid])
        if metrics is not None:
            metrics["precision-fallback-coords"] = update.fallback_coords
            metrics["clipped-coords"] = clipped_coords
            metrics["clipped-replies"] = len(unaccepted) - len(left_out)
            if self.cfg.aggregation == "multi-krum":
                metrics["left-out-replies"] = len(left_out)
        return self.global_records()[0], metrics

    def left_out_by_multi_krum(self, valid: Sequence[Message]) -> set[int]:
        """Indices into `valid` of the replies `multi_krum_keep` leaves out (none unless
        `aggregation = "multi-krum"`): the only step that holds every reply's mean at once."""
        if self.cfg.aggregation != "multi-krum":
            return set()
        means = [flatten(record_to_numpy(r.content.array_records[records.ARRAYS])) for r in valid]
        kept = multi_krum_keep(means, self.precision, self.cfg.krum_byzantine)
        return set(range(len(valid))) - set(kept)
