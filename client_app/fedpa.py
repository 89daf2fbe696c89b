"""Client half of FedPA (Federated Posterior Averaging): pure torch math, then the round step.

A FedPA client approximates its local posterior by a Gaussian N(mu, Sigma) from IASG samples
(averages of the SGD iterates of one local epoch) and sends Delta = Sigma_hat^-1 (mu_hat - theta)
instead of FedAvg's theta_last - theta. Sigma_hat is the shrinkage estimate

    Sigma_hat = rho_l I + (1 - rho_l) S,    rho_l = 1 / (1 + (l - 1) rho),

with S the unbiased sample covariance of the l samples. Everything works on the whole trainable
parameter vector flattened into one 1-D tensor (`task.params.flatten`): the covariance couples
all parameters, so running the recursion tensor by tensor would be a different algorithm.
"""

from __future__ import annotations

import torch
from flwr.app import MetricRecord, RecordDict
from torch import Tensor

from client_app.compression import encode_reply
from client_app.local import ClientRound
from client_app.optimizers import build_optimizer
from client_app.training import train_epochs
from task import records
from task.params import flatten, split_flat


class StreamingPosteriorDelta:
    """FedPA's Delta = Sigma_hat^-1 (mu_hat - theta), fed one sample at a time in O(l d) memory.

    With the scatter matrix M = (l - 1) S, Sigma_hat = A / (1 + (l - 1) rho) where A = I + rho M,
    so Delta = (1 + (l - 1) rho) A^-1 (mu_hat - theta). Welford's update makes each new sample a
    rank-one change of M, M_n = M_{n-1} + ((n - 1) / n) u u^T with u = x_n - mu_hat_{n-1}, and
    Sherman-Morrison keeps A_n^-1 implicit as I - sum_k coef_k v_k v_k^T. The object stores
    mu_hat_n, D_n = A_n^-1 (mu_hat_n - theta) and the (v_k, coef_k); no d x d matrix is formed.
    Cost per sample is O(n d). Computation runs in the dtype of `theta`.
    """

    def __init__(self, theta: Tensor, rho: float) -> None:
        if theta.dim() != 1:
            raise ValueError(f"theta must be a flat 1-D tensor, got shape {tuple(theta.shape)}")
        if not rho >= 0.0:  # also rejects NaN
            raise ValueError(f"rho must be >= 0, got {rho}")
        self._theta = theta.detach().clone()
        self._rho = float(rho)
        self._mean: Tensor | None = None
        self._solved: Tensor | None = None  # D_n = A_n^-1 (mu_hat_n - theta)
        self._directions: list[Tensor] = []  # v_k = A_{k-1}^-1 u_k, k = 2..n
        self._coefficients: list[Tensor] = []  # g_k / (1 + g_k u_k . v_k)
        self._num_samples = 0

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def add_sample(self, sample: Tensor) -> None:
        """Add one flat sample (same shape and dtype as theta)."""
        if sample.shape != self._theta.shape or sample.dtype != self._theta.dtype:
            raise ValueError(
                f"sample {tuple(sample.shape)} {sample.dtype} does not match "
                f"theta {tuple(self._theta.shape)} {self._theta.dtype}"
            )
        sample = sample.detach()
        n = self._num_samples + 1
        if self._mean is None or self._solved is None:
            self._mean = sample.clone()
            self._solved = sample - self._theta
        else:
            # Welford's rank-one term needs the deviation from the mean BEFORE this sample.
            deviation = sample - self._mean
            direction = deviation.clone()
            for previous, coefficient in zip(self._directions, self._coefficients):
                direction -= (coefficient * torch.dot(previous, deviation)) * previous
            gain = self._rho * (n - 1) / n
            # u^T A_{n-1}^-1 u >= 0, so the denominator is >= 1.
            denominator = 1.0 + gain * torch.dot(deviation, direction)
            # Sherman-Morrison for A_n = A_{n-1} + gain u u^T, applied to
            # mu_hat_n - theta = (mu_hat_{n-1} - theta) + u / n; since A_{n-1}^-1 is symmetric,
            # v . (mu_hat_{n-1} - theta) = u . D_{n-1}.
            overlap = torch.dot(deviation, self._solved)
            self._solved = (
                self._solved + ((1.0 - gain * n * overlap) / (denominator * n)) * direction
            )
            self._directions.append(direction)
            self._coefficients.append(gain / denominator)
            self._mean = self._mean + deviation / n
        self._num_samples = n

    def delta(self) -> Tensor:
        """Delta = (1 + (l - 1) rho) D_l for the l samples added so far."""
        if self._solved is None:
            raise RuntimeError("delta() needs at least one sample")
        return (1.0 + (self._num_samples - 1) * self._rho) * self._solved


class IterateAverager:
    """Mean of the post-step iterates of one local epoch: that epoch's IASG sample."""

    def __init__(self) -> None:
        self._total: Tensor | None = None
        self._dtype: torch.dtype | None = None
        self._num_iterates = 0

    @property
    def num_iterates(self) -> int:
        return self._num_iterates

    def add_iterate(self, iterate: Tensor) -> None:
        """Add the flat parameter vector as it is after one optimizer step."""
        # Samples differ from each other by far less than their size, and the covariance is
        # built from those differences: a float32 sum over hundreds of steps would blur them.
        contribution = iterate.detach().to(torch.float64)
        if self._total is None:
            self._total = contribution.clone()
            self._dtype = iterate.dtype
        else:
            self._total += contribution
        self._num_iterates += 1

    def finish_epoch(self) -> Tensor:
        """Return the mean of the iterates added since the last call, in their dtype, and reset."""
        if self._total is None or self._dtype is None:
            raise RuntimeError("finish_epoch() needs at least one iterate")
        average = (self._total / self._num_iterates).to(self._dtype)
        self._total = None
        self._dtype = None
        self._num_iterates = 0
        return average


def sanitize_delta(delta: Tensor, num_examples: int) -> tuple[Tensor, int]:
    """Return (delta, num_examples), or (zeros, 0) when delta holds any NaN or Inf.

    Weight 0 means the server ignores this client instead of letting one diverged client
    poison the global model.
    """
    if bool(torch.isfinite(delta).all()):
        return delta, num_examples
    return torch.zeros_like(delta), 0


def correction_norm(delta: Tensor, theta_last: Tensor, theta: Tensor) -> float:
    """||Delta - (theta_last - theta)||: how far FedPA's update is from FedAvg's."""
    return float(torch.linalg.vector_norm(delta - (theta_last - theta)))


def sampling_active(
    server_round: int,
    burnin_rounds: int,
    local_epochs: int,
    local_burnin_epochs: int = 1,
) -> bool:
    """Whether a client computes the FedPA delta (True) or the FedAvg delta (False) this round.

    `server_round` is Flower's count, starting at 1; the spec counts rounds from 0, so round
    r0 = server_round - 1 samples iff r0 >= burnin_rounds. Even then a client whose local epochs
    are all local burn-in (E <= m) has no sample and falls back to FedAvg.
    """
    if server_round < 1:
        raise ValueError(f"server_round counts from 1, got {server_round}")
    if burnin_rounds < 0 or local_epochs < 1 or local_burnin_epochs < 0:
        raise ValueError(
            f"need burnin_rounds >= 0, local_epochs >= 1, local_burnin_epochs >= 0; got "
            f"{burnin_rounds}, {local_epochs}, {local_burnin_epochs}"
        )
    return server_round - 1 >= burnin_rounds and local_epochs > local_burnin_epochs


def train(round_: ClientRound) -> RecordDict:
    """Local SGD from the global weights; reply with Delta (FedAvg's delta during burn-in)."""
    cfg = round_.cfg
    model = round_.model_at()
    names, params = zip(*model.named_parameters())
    theta = flatten(params)
    # A fresh optimizer each round: its momentum lives for this round's epochs only.
    optimizer = build_optimizer(cfg, model.parameters(), cfg.local_lr, len(round_.train))
    sampling = sampling_active(
        round_.server_round, cfg.burnin_rounds, cfg.local_epochs, cfg.local_burnin_epochs
    )
    averager = IterateAverager()
    posterior_delta = StreamingPosteriorDelta(theta, cfg.shrinkage_rho)

    def after_epoch(epoch: int) -> None:
        sample = averager.finish_epoch()
        if epoch >= cfg.local_burnin_epochs:
            posterior_delta.add_sample(sample)

    loss = train_epochs(
        model, round_.train, optimizer, cfg.local_epochs, cfg.batch_size, round_.device,
        round_.seed,
        after_step=(lambda: averager.add_iterate(flatten(params))) if sampling else None,
        after_epoch=after_epoch if sampling else None,
    )
    theta_last = flatten(params)
    delta = posterior_delta.delta() if sampling else theta_last - theta
    delta, weight = sanitize_delta(delta, len(round_.train))
    pieces = split_flat(delta, [p.shape for p in params])
    arrays = {name: piece.cpu().numpy() for name, piece in zip(names, pieces)}
    sent, _ = encode_reply(round_, {records.ARRAYS: flatten(list(arrays.values()))}, arrays)
    return RecordDict(
        {
            records.ARRAYS: sent[records.ARRAYS],
            records.METRICS: MetricRecord(
                {
                    records.NUM_EXAMPLES: weight,
                    "loss": loss,
                    "fedpa-samples": posterior_delta.num_samples if sampling else 0,
                    "correction-norm": correction_norm(delta, theta_last, theta),
                }
            ),
        }
    )
