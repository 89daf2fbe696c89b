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

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch


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
    def zeros_like(cls, vector) -> "DualSums":
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
    `prior_precision` (a scalar or a vector). Where S_g is not finite and strictly positive, that
    coordinate falls back to the precision-weighted average of A, so the global is always a valid
    Gaussian; `fallback_coords` counts them.
    """
    if not client_means or len(client_means) != len(client_precisions):
        raise ValueError("need one precision per client mean, from at least one client")
    if len(client_means) > num_clients:
        raise ValueError(f"{len(client_means)} replies from a federation of {num_clients} clients")
    alpha = 1.0 / (1.0 + num_clients * rho)
    num_replies = len(client_means)
    average_precision = sum(client_precisions) / num_replies
    average_natural_mean = (
        sum(precision * mean for mean, precision in zip(client_means, client_precisions))
        / num_replies
    )
    precision = (1.0 - alpha) * average_precision + alpha * (prior_precision - dual_precision_sum)
    natural_mean = (1.0 - alpha) * average_natural_mean - alpha * dual_mean_sum

    xp = _array_module(precision)
    fallback = ~(xp.isfinite(precision) & (precision > 0))
    precision = xp.where(fallback, average_precision, precision)
    natural_mean = xp.where(fallback, average_natural_mean, natural_mean)
    return ServerUpdate(natural_mean / precision, precision, int(fallback.sum()))


def cosine_lr(lr0: float, round_index: int, num_rounds: int) -> float:
    """lr0 (1 + cos(pi r / R)) / 2 for round r = 0, ..., R - 1; constant within a round."""
    return lr0 * 0.5 * (1.0 + math.cos(math.pi * round_index / num_rounds))


def _array_module(vector):
    return torch if isinstance(vector, torch.Tensor) else np
