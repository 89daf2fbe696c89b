"""Robust aggregation for FedAvg and FedPA: a cap on one reply's weight, update-norm clipping
(fixed or adaptive) and Byzantine-robust combiners of the client deltas.

The combiners are Flower's own (`flwr.server.strategy.aggregate`); this module only adapts them
to deltas with weights and adds what Flower lacks (the weight cap). Every combiner works on the
deltas theta_k - theta (FedPA: Delta_k), which gives the same answer as working on the models:
trimmed mean, median and Krum's distances all commute with a common shift.

The default, `mean`, stays `strategies.fedavg.weighted_mean`, which streams (one client's delta
in memory at a time); the robust combiners need every reply at once (K x P floats).

All functions are pure: they return new arrays and never write into their arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from flwr.server.strategy.aggregate import (
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)
from flwr.supercore.differential_privacy import adaptive_clip_inputs_inplace, get_norm


Arrays = list[np.ndarray]
# Andrew et al. (2019), as Flower's adaptive-clipping strategies use it by default.
CLIP_NORM_LR = 0.2


def cap_weights(weights: Sequence[float], max_share: float) -> list[float]:
    """Weights whose shares of the total are at most `max_share`, renormalized to sum to 1.

    Water-filling: the replies over the cap get exactly `max_share` each and the others share
    what is left in proportion to their weights, repeated until nobody is over (a reply pushed
    over the cap by the renormalization is capped in the next pass). Weight-0 replies stay 0.
    With fewer than 1 / max_share positive weights the cap cannot hold; every positive weight
    then gets the same share, the closest to it. `max_share = 1` returns the weights unchanged.
    """
    weights = [float(w) for w in weights]
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    if any(not (math.isfinite(w) and w >= 0) for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    if max_share == 1 or not any(w > 0 for w in weights):
        return weights
    positive = [i for i, w in enumerate(weights) if w > 0]
    if len(positive) * max_share <= 1:
        return [1.0 / len(positive) if w > 0 else 0.0 for w in weights]
    capped: set[int] = set()
    while True:
        free = [i for i in positive if i not in capped]
        left = 1.0 - len(capped) * max_share
        free_total = sum(weights[i] for i in free)
        over = {i for i in free if left * weights[i] / free_total > max_share}
        if not over:
            break
        capped |= over
    shares = [0.0] * len(weights)
    for i in free:
        shares[i] = left * weights[i] / free_total
    for i in capped:
        shares[i] = max_share
    return shares


def clip_update(delta: Sequence[np.ndarray], max_norm: float) -> tuple[Arrays, bool]:
    """`delta` scaled to L2 norm at most `max_norm` (Flower's FlatClip), and whether it was cut."""
    clipped = [np.array(array, copy=True) for array in delta]
    if get_norm(clipped) == 0:  # Flower's helper divides by the norm
        return clipped, False
    return clipped, adaptive_clip_inputs_inplace(clipped, max_norm)


def adapt_clip_norm(norm: float, unclipped_fraction: float, target_quantile: float) -> float:
    """Andrew et al.'s geometric update without DP noise: norm * exp(-lr (b - gamma)), with b the
    share of this round's updates that were not clipped and gamma the quantile of update norms
    the clip should track. (Flower's adaptive-clipping wrappers feed the share of clipped
    updates as b, which drives the norm the wrong way; this follows the paper.)"""
    return norm * math.exp(-CLIP_NORM_LR * (unclipped_fraction - target_quantile))


def robust_combine(
    aggregation: str,
    deltas: Iterable[Sequence[np.ndarray]],
    weights: Sequence[float],
    trim_fraction: float = 0.2,
    byzantine: int = 1,
) -> Arrays | None:
    """Combine client deltas with `trimmed-mean`, `median`, `krum` or `multi-krum` (Flower's
    functions: the first three ignore the weights, multi-krum averages the n - f best-scoring
    replies by weight). None when no reply has weight, like `weighted_mean`.

    Weight-0 replies are left out of every combiner. Results keep the clients' dtype.
    """
    pairs = [(list(d), float(w)) for d, w in zip(deltas, weights, strict=True) if w > 0]
    if not pairs:
        return None
    like = [np.asarray(array) for array in pairs[0][0]]
    for delta, _ in pairs:
        if len(delta) != len(like) or any(np.shape(a) != r.shape for a, r in zip(delta, like)):
            raise ValueError("clients sent different numbers or shapes of arrays")
    results = [([np.asarray(a, dtype=np.float64) for a in d], w) for d, w in pairs]
    if aggregation == "trimmed-mean":
        combined = aggregate_trimmed_avg(results, trim_fraction)
    elif aggregation == "median":
        combined = aggregate_median(results)
    elif aggregation in ("krum", "multi-krum"):
        keep = 0 if aggregation == "krum" else max(1, len(results) - byzantine)
        combined = aggregate_krum(results, byzantine, keep)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    return [np.asarray(array).astype(ref.dtype) for array, ref in zip(combined, like)]


def combiner(aggregation: str, trim_fraction: float, byzantine: int) -> Callable:
    """`robust_combine` with the run's settings, in `weighted_mean`'s signature."""
    return lambda deltas, weights: robust_combine(
        aggregation, deltas, weights, trim_fraction, byzantine
    )
