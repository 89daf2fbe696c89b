"""IVON with a Gaussian prior and BayesADMM dual terms: the client optimizer of IVON-ADMM.

Client k approximately solves (spec section 2)

    min_q  E_q[(N_k/tau) l_k(theta) + 1/2 theta^T diag(V_k) theta - v_k^T theta]
           + rho * KL(q || N(prior_mean, diag(prior_precision)^-1))

with IVON at effective sample size ess = N_k / (tau * rho). Divided by N_k / tau, the prior becomes a
per-coordinate weight decay wd = prior_precision / ess around prior_mean, and the duals become
dm = tau v_k / N_k (a constant gradient) and dp = tau V_k / N_k (an exact curvature). The posterior
of the optimizer is N(weights, diag(ess (hess + wd))^-1).

The hot path (sampling, restoring, collecting gradients, the update) is our own, not stock IVON's:
stock IVON concatenates the parameters, the noise and the gradients into fresh tensors and
allocates every intermediate of the update on each step, which costs more than the model itself
on small networks. Here the parameters are views into one flat buffer that persists between steps,
the weight sample lives in a second buffer that the parameters are pointed at while sampled, and
every elementwise operation writes into preallocated buffers. Each operation is the same
floating-point operation, on the same operands and in the same order, as stock IVON's, and the
noise comes from the same `torch.randn` calls: with prior mean 0, a scalar prior precision and zero
duals the result equals stock `ivon.IVON` bit for bit (tests/test_ivon_admm.py).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from ivon import IVON

from task.params import flatten, split_flat


def effective_sample_size(num_examples: int, temperature: float, rho: float) -> float:
    """ess_k = N_k / (tau * rho): the client's likelihood weight relative to its ADMM prior."""
    return num_examples / (temperature * rho)


class IVONADMM(IVON):
    """Stock IVON plus a prior mean, a per-coordinate prior precision and scaled duals per group.

    Use it like stock IVON (closure sampling under `sampled_params(train=True)`, `mc_samples`).
    All accessors take and return flat vectors over every parameter in param-group order.
    `rescale_lr` defaults to False: the stock rescaling multiplies lr by (hess_init + wd), and wd
    is the global precision, which changes every round.

    Unlike stock IVON, the parameters, `param_groups[i]["momentum"]` and `["hess"]` are updated in
    place: copy them to keep a snapshot. A tensor assigned to `momentum` or `hess` from outside
    (a restored state) is copied into the optimizer's own buffer at the next step, never written to.
    """

    def __init__(self, params, lr: float, ess: float, rescale_lr: bool = False, **ivon_kwargs):
        super().__init__(params, lr=lr, ess=ess, rescale_lr=rescale_lr, **ivon_kwargs)
        for group in self.param_groups:
            zeros = torch.zeros(group["numel"], device=self._device, dtype=self._dtype)
            group["prior_mean"] = zeros
            group["dual_mean"] = zeros.clone()
            group["dual_precision"] = zeros.clone()
        self._buffers = _FlatBuffers(self)

    # ------------------------------------------------------------------ prior, duals, posterior

    def set_prior(self, mean, precision) -> None:
        """Prior N(mean, diag(precision)^-1); precision is a positive scalar or a flat vector."""
        _check_positive("prior precision", precision)
        for group, group_mean, group_precision in zip(
            self.param_groups, self._split(mean), self._split_or_scalar(precision)
        ):
            group["prior_mean"] = group_mean
            # A scalar stays a Python float so that the update computes exactly what stock IVON does.
            group["weight_decay"] = group_precision / group["ess"]

    def set_duals(self, dual_mean, dual_precision, num_examples: int, temperature: float) -> None:
        """Client duals (v_k, V_k) as flat vectors; stored scaled, dm = tau v / N, dp = tau V / N."""
        scale = temperature / num_examples
        for group, group_dual_mean, group_dual_precision in zip(
            self.param_groups, self._split(dual_mean), self._split(dual_precision)
        ):
            group["dual_mean"] = scale * group_dual_mean
            group["dual_precision"] = scale * group_dual_precision

    def set_posterior(self, mean, precision) -> None:
        """Weights := mean and hess := precision / ess - wd, so that get_posterior() returns them.

        Call set_prior first when both change: hess is stored relative to the current wd.
        """
        _check_positive("posterior precision", precision)
        means, precisions = self._split(mean), self._split(precision)
        weights = self._buffers.mean_views()
        for group, weight, group_mean, group_precision in zip(
            self.param_groups, weights, means, precisions
        ):
            group["hess"] = group_precision / group["ess"] - group["weight_decay"]
            weight.copy_(group_mean)

    def get_posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, precision) = (weights, ess (hess + wd)); call it outside `sampled_params`."""
        params = [p for group in self.param_groups for p in group["params"] if p is not None]
        mean = flatten(params)
        precision = torch.cat(
            [group["ess"] * (group["hess"] + group["weight_decay"]) for group in self.param_groups]
        )
        return mean, precision

    # ------------------------------------------------------------------ the hot path

    @contextmanager
    def sampled_params(self, train: bool = False):
        """Point the parameters at a weight sample; on exit point them back at the mean and, with
        `train`, add this sample's gradient to the running averages that `step` uses."""
        buffers = self._buffers
        buffers.draw_sample(self)
        try:
            yield
        except BaseException:
            buffers.point_params_at_mean()  # the sample is dropped, the mean is intact
            raise
        buffers.point_params_at_mean()
        if train:
            buffers.collect_gradient(self)

    def _update(self):
        """One IVON step (spec section 2) on the averaged gradient samples, in place.

        Each comment gives the expression of stock IVON (or of the prior/dual terms) that the lines
        below it compute; the operations and their order are exactly those, so rounding is too.
        A prior mean or dual that is all zeros is skipped: adding or subtracting 0 changes no value.
        """
        if self.state["avg_grad"] is None:
            raise RuntimeError("step() needs a sampled_params(train=True) pass since the last step")
        self.current_step += 1
        buffers = self._buffers
        for index, group in enumerate(self.param_groups):
            views = buffers.groups[index]
            mean, scratch_a, scratch_b = views.mean, views.a, views.b
            momentum = buffers.owned(group, index, "momentum")
            hess = buffers.owned(group, index, "hess")
            wd, ess = group["weight_decay"], group["ess"]
            beta1, beta2 = group["beta1"], group["beta2"]
            dual_precision = group["dual_precision"]
            has_dual_precision = not buffers.is_zero(index, dual_precision)

            # momentum = beta1 momentum + (1 - beta1) avg_grad          (avg_grad is used up here)
            momentum.mul_(beta1).add_(views.avg_grad.mul_(1.0 - beta1))

            # h_hat = (avg_nxg (hess + wd)) ess + dp          (gradsq: avg_gsq ess + dp)
            hess_wd = buffers.hess_plus_wd(group, index, hess)
            h_hat = views.avg_nxg.mul_(hess_wd) if self.hess_approx == "price" else views.avg_gsq
            h_hat.mul_(ess)
            if has_dual_precision:
                h_hat.add_(dual_precision)
            # hess = beta2 hess + (1 - beta2) h_hat + (1/2 (1 - beta2)^2 (hess - h_hat)^2) / (hess + wd)
            correction = torch.sub(hess, h_hat, out=scratch_a).square_()
            correction.mul_(0.5 * (1 - beta2) ** 2).div_(hess_wd)
            hess.mul_(beta2).add_(h_hat.mul_(1.0 - beta2)).add_(correction)

            # gradient = momentum / debias + wd (mean - prior_mean) + dp mean - dm
            debias = 1.0 - math.pow(beta1, float(self.current_step)) if self.debias else 1.0
            gradient = torch.div(momentum, debias, out=scratch_b)
            prior_mean = group["prior_mean"]
            if buffers.is_zero(index, prior_mean):
                gradient.add_(torch.mul(mean, wd, out=scratch_a))
            else:
                gradient.add_(torch.sub(mean, prior_mean, out=scratch_a).mul_(wd))
            if has_dual_precision:
                gradient.add_(torch.mul(dual_precision, mean, out=scratch_a))
            if not buffers.is_zero(index, group["dual_mean"]):
                gradient.sub_(group["dual_mean"])
            # mean = mean - lr clip(gradient / (hess + wd), +-radius)
            gradient.div_(buffers.hess_plus_wd(group, index, hess))
            radius = group["clip_radius"]
            if math.isfinite(radius):  # clipping at +-inf changes no value (NaN stays NaN)
                gradient.clamp_(min=-radius, max=radius)
            lr = group["lr"] * (group["hess_init"] + wd) if self.rescale_lr else group["lr"]
            mean.sub_(gradient.mul_(lr))

    # ------------------------------------------------------------------ flat-vector helpers

    def _split(self, flat) -> list[torch.Tensor]:
        # A copy, so that no caller's tensor ever aliases the weights or the prior.
        flat = torch.as_tensor(flat, device=self._device, dtype=self._dtype).flatten().clone()
        return split_flat(flat, [(group["numel"],) for group in self.param_groups])

    def _split_or_scalar(self, value) -> tuple:
        if torch.as_tensor(value).dim() == 0:
            return (torch.as_tensor(value).item(),) * len(self.param_groups)
        return self._split(value)


class _GroupViews:
    """One param group's slices of the flat buffers (made once: slicing costs on every step)."""

    def __init__(self, buffers: _FlatBuffers, start: int, stop: int) -> None:
        self.size = stop - start
        for name in ("mean", "sample", "noise", "avg_grad", "avg_nxg", "avg_gsq", "a", "b", "hess_wd"):
            flat = getattr(buffers, name)
            setattr(self, name, None if flat is None else flat[start:stop])


class _FlatBuffers:
    """The optimizer's persistent flat vectors, all in the stock layout (param groups in order).

    `mean` holds the weights: every parameter's `.data` is a view into it between steps, so the
    update writes the model directly. While sampled, the parameters are views into `sample`.
    `avg_grad` and `avg_nxg` are stock IVON's `state["avg_grad"]` and `state["avg_nxg"]`.
    """

    def __init__(self, optimizer: IVONADMM) -> None:
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p is not None]
        numel, like = optimizer._numel, dict(device=optimizer._device, dtype=optimizer._dtype)

        def empty() -> torch.Tensor:
            return torch.empty(numel, **like)

        self.mean, self.sample, self.noise = empty(), empty(), empty()
        self.avg_grad, self.avg_nxg = empty(), empty()
        self.avg_gsq = empty() if optimizer.hess_approx == "gradsq" else None
        self.a, self.b, self.hess_wd = empty(), empty(), empty()
        self.grad_sample: torch.Tensor | None = None  # a second gradient, for mc_samples > 1
        self.groups, start = [], 0
        for group in optimizer.param_groups:
            self.groups.append(_GroupViews(self, start, start + group["numel"]))
            start += group["numel"]
        # Per group: the (tensor, version, ...) that a cached value was computed from.
        self._hess_wd_of: list[tuple | None] = [None] * len(self.groups)
        self._zero_of: list[dict[int, tuple]] = [{} for _ in self.groups]
        self._owned: list[dict[str, torch.Tensor]] = [{} for _ in self.groups]
        self._mean_views = self._views(self.mean)
        self._sample_views = self._views(self.sample)
        self._mean_ptrs: list[int] = []
        self.gather_params()

    # ---------------------------------------------------------------- parameters as views

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return split_flat(flat, [p.shape for p in self.params])

    def gather_params(self) -> None:
        """Copy the current weights into `mean` and make every parameter a view into it."""
        if self.params:  # via a new tensor: the parameters may already be views into `mean`
            self.mean.copy_(flatten(self.params))
        self.point_params_at_mean()

    def point_params_at_mean(self) -> None:
        for p, view in zip(self.params, self._mean_views):
            p.data = view
        self._mean_ptrs = [p.data_ptr() for p in self.params]

    def ensure_params_are_views(self) -> None:
        """Someone may have assigned `p.data` (e.g. model.to()); take the weights back in."""
        if any(p.data_ptr() != ptr for p, ptr in zip(self.params, self._mean_ptrs)):
            self.gather_params()

    def mean_views(self) -> list[torch.Tensor]:
        """Per group, the flat slice of `mean` that holds its weights."""
        self.ensure_params_are_views()
        return [views.mean for views in self.groups]

    # ---------------------------------------------------------------- state tensors

    def owned(self, group: dict, index: int, key: str) -> torch.Tensor:
        """group[key] as a buffer this optimizer may write in place.

        The first time, and whenever someone assigned a new tensor to group[key], its values are
        copied into a buffer of our own (the assigned tensor may share memory with a caller's).
        """
        current = group[key]
        own = self._owned[index].get(key)
        if current is own:
            return own
        if own is None:
            own = torch.empty_like(self.groups[index].mean)
            self._owned[index][key] = own
        own.copy_(current)
        group[key] = own
        return own

    def hess_plus_wd(self, group: dict, index: int, hess: torch.Tensor) -> torch.Tensor:
        """hess + wd for the group, recomputed only when hess or wd changed since last time."""
        wd = group["weight_decay"]
        key = (hess, hess._version, wd, wd._version if isinstance(wd, torch.Tensor) else None)
        out = self.groups[index].hess_wd
        cached = self._hess_wd_of[index]
        if cached is None or not _same_key(cached, key):
            torch.add(hess, wd, out=out)
            self._hess_wd_of[index] = key
        return out

    def is_zero(self, index: int, tensor: torch.Tensor) -> bool:
        """Whether every entry is 0, remembered until the tensor changes."""
        cached = self._zero_of[index].get(id(tensor))
        if cached is None or cached[0] is not tensor or cached[1] != tensor._version:
            cached = (tensor, tensor._version, not bool(tensor.any()))
            if len(self._zero_of[index]) > 8:  # old prior and dual tensors: let them go
                self._zero_of[index].clear()
            self._zero_of[index][id(tensor)] = cached
        return cached[2]

    # ---------------------------------------------------------------- sampling and gradients

    def draw_sample(self, optimizer: IVONADMM) -> None:
        """sample = mean + randn / sqrt(ess (hess + wd)), one randn per group as stock IVON draws."""
        self.ensure_params_are_views()
        for index, group in enumerate(optimizer.param_groups):
            views = self.groups[index]
            hess = self.owned(group, index, "hess")
            # The standard deviation goes where the sample will be: one buffer fewer to touch.
            std = torch.mul(self.hess_plus_wd(group, index, hess), group["ess"], out=views.sample)
            torch.randn(views.size, out=views.noise)
            views.noise.div_(std.sqrt_())
            torch.add(views.mean, views.noise, out=views.sample)
        for p, view in zip(self.params, self._sample_views):
            p.data = view

    def collect_gradient(self, optimizer: IVONADMM) -> None:
        """Add this sample's gradient (and noise x gradient) to stock IVON's Welford averages."""
        state = optimizer.state
        count = state["count"] + 1
        state["count"] = count
        if count == 1:
            grad = self.avg_grad
        else:
            if self.grad_sample is None:
                self.grad_sample = torch.empty_like(self.avg_grad)
            grad = self.grad_sample
        pieces = [
            # A parameter without a gradient (frozen, or unused by the loss) contributes zeros.
            p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
            for p in self.params
        ]
        torch.cat(pieces, out=grad)
        if optimizer.hess_approx == "price":
            if count == 1:
                torch.mul(self.noise, grad, out=self.avg_nxg)
            else:
                _welford(self.avg_nxg, self.noise.mul_(grad), count)
            state["avg_nxg"] = self.avg_nxg
        else:
            if count == 1:
                torch.square(grad, out=self.avg_gsq)
            else:
                _welford(self.avg_gsq, torch.square(grad, out=self.a), count)
            state["avg_gsq"] = self.avg_gsq
        if count > 1:
            _welford(self.avg_grad, grad, count)
        state["avg_grad"] = self.avg_grad


def _welford(average: torch.Tensor, new: torch.Tensor, count: int) -> None:
    """average += (new - average) / count, in place; `new` is overwritten."""
    average.add_(new.sub_(average).div_(count))


def _same_key(old: tuple, new: tuple) -> bool:
    old_hess, old_version, old_wd, old_wd_version = old
    new_hess, new_version, new_wd, new_wd_version = new
    if old_hess is not new_hess or old_version != new_version:
        return False
    if isinstance(new_wd, torch.Tensor):
        return old_wd is new_wd and old_wd_version == new_wd_version
    return not isinstance(old_wd, torch.Tensor) and old_wd == new_wd


def _check_positive(name: str, value) -> None:
    if not bool((torch.as_tensor(value) > 0).all()):
        raise ValueError(f"{name} must be positive")
