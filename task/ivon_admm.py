"""IVON with a Gaussian prior and BayesADMM dual terms: the client optimizer of IVON-ADMM.

Client k approximately solves (spec section 2)

    min_q  E_q[(N_k/tau) l_k(theta) + 1/2 theta^T diag(V_k) theta - v_k^T theta]
           + rho * KL(q || N(prior_mean, diag(prior_precision)^-1))

with IVON at effective sample size ess = N_k / (tau * rho). Divided by N_k / tau, the prior becomes a
per-coordinate weight decay wd = prior_precision / ess around prior_mean, and the duals become
dm = tau v_k / N_k (a constant gradient) and dp = tau V_k / N_k (an exact curvature). The posterior
of the optimizer is N(weights, diag(ess (hess + wd))^-1).
"""

import math

import torch
from ivon import IVON


def effective_sample_size(num_examples: int, temperature: float, rho: float) -> float:
    """ess_k = N_k / (tau * rho): the client's likelihood weight relative to its ADMM prior."""
    return num_examples / (temperature * rho)


class IVONADMM(IVON):
    """Stock IVON plus a prior mean, a per-coordinate prior precision and scaled duals per group.

    Use it like stock IVON (closure sampling under `sampled_params(train=True)`, `mc_samples`).
    All accessors take and return flat vectors over every parameter in param-group order.
    `rescale_lr` defaults to False: the stock rescaling multiplies lr by (hess_init + wd), and wd
    is the global precision, which changes every round.
    """

    def __init__(self, params, lr: float, ess: float, rescale_lr: bool = False, **ivon_kwargs):
        super().__init__(params, lr=lr, ess=ess, rescale_lr=rescale_lr, **ivon_kwargs)
        for group in self.param_groups:
            zeros = torch.zeros(group["numel"], device=self._device, dtype=self._dtype)
            group["prior_mean"] = zeros
            group["dual_mean"] = zeros.clone()
            group["dual_precision"] = zeros.clone()

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
        for group, group_mean, group_precision in zip(self.param_groups, means, precisions):
            group["hess"] = group_precision / group["ess"] - group["weight_decay"]
            self._write_group_params(group, group_mean)

    def get_posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, precision) = (weights, ess (hess + wd)); call it outside `sampled_params`."""
        params = [p for group in self.param_groups for p in group["params"] if p is not None]
        mean = torch.cat([p.detach().flatten() for p in params])
        precision = torch.cat(
            [group["ess"] * (group["hess"] + group["weight_decay"]) for group in self.param_groups]
        )
        return mean, precision

    def _update(self):
        self.current_step += 1
        offset = 0
        for group in self.param_groups:
            group_slice = slice(offset, offset + group["numel"])
            offset += group["numel"]
            mean = torch.cat([p.flatten() for p in group["params"] if p is not None])
            wd, beta2 = group["weight_decay"], group["beta2"]

            group["momentum"] = self._new_momentum(
                self.state["avg_grad"][group_slice], group["momentum"], group["beta1"]
            )

            # The dual's quadratic term has exact curvature dp; only the data part is estimated.
            hess = group["hess"]
            data_hess = self._get_nll_hess(
                self.hess_approx, hess + wd, self.state["avg_nxg"], self.state["avg_gsq"], group_slice
            )
            hess_sample = data_hess * group["ess"] + group["dual_precision"]
            # Stock IVON's EMA with its second-order correction, which keeps hess + wd positive.
            hess = (
                beta2 * hess
                + (1.0 - beta2) * hess_sample
                + (0.5 * (1 - beta2) ** 2) * (hess - hess_sample).square() / (hess + wd)
            )
            group["hess"] = hess

            debias = 1.0 - math.pow(group["beta1"], float(self.current_step)) if self.debias else 1.0
            lr = group["lr"] * (group["hess_init"] + wd) if self.rescale_lr else group["lr"]
            # Prior and dual gradients are exact at the current mean, so they bypass the momentum
            # average and its debiasing; only the noisy data gradient is averaged.
            gradient = (
                group["momentum"] / debias
                + wd * (mean - group["prior_mean"])
                + group["dual_precision"] * mean
                - group["dual_mean"]
            )
            radius = group["clip_radius"]
            mean = mean - lr * torch.clip(gradient / (hess + wd), min=-radius, max=radius)
            self._write_group_params(group, mean)

    def _split(self, flat) -> tuple[torch.Tensor, ...]:
        # A copy, so that no caller's tensor ever aliases the weights or the prior.
        flat = torch.as_tensor(flat, device=self._device, dtype=self._dtype).flatten().clone()
        if flat.numel() != self._numel:
            raise ValueError(f"expected a flat vector of {self._numel} values, got {flat.numel()}")
        return flat.split([group["numel"] for group in self.param_groups])

    def _split_or_scalar(self, value) -> tuple:
        if torch.as_tensor(value).dim() == 0:
            return (torch.as_tensor(value).item(),) * len(self.param_groups)
        return self._split(value)

    @staticmethod
    def _write_group_params(group, flat_values: torch.Tensor) -> None:
        offset = 0
        for p in group["params"]:
            if p is None:
                continue
            p.data = flat_values[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()


def _check_positive(name: str, value) -> None:
    if not bool((torch.as_tensor(value) > 0).all()):
        raise ValueError(f"{name} must be positive")
