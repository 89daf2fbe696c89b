"""The readable IVON-ADMM that `task.ivon_admm.IVONADMM` is pinned to.

`IVONADMM` computes its update in place in preallocated buffers; `ReferenceIVONADMM` is the same
optimizer as the formulas read (spec section 2), each intermediate a new tensor. The tests require
both to give the same bits (tests/test_ivon_admm.py), and `benchmarks/system` times the two side by
side (`ivon-admm-unfused` in the step-time table).
"""

from __future__ import annotations

import math

import torch
from ivon import IVON

from task.params import flatten, split_flat


class ReferenceIVONADMM(IVON):
    """IVON-ADMM as it was before the hot-path rewrite (commit 3118c08): stock IVON's sampling,
    restoring and gradient collection, and an `_update` written as the formulas read, allocating
    every intermediate. Accessors: `set_prior` and `set_duals` as in IVONADMM.
    """

    def __init__(self, params, lr: float, ess: float, rescale_lr: bool = False, **kwargs):
        super().__init__(params, lr=lr, ess=ess, rescale_lr=rescale_lr, **kwargs)
        for group in self.param_groups:
            zeros = torch.zeros(group["numel"], device=self._device, dtype=self._dtype)
            group["prior_mean"], group["dual_mean"], group["dual_precision"] = (
                zeros, zeros.clone(), zeros.clone()
            )

    def _split(self, flat):
        flat = torch.as_tensor(flat, device=self._device, dtype=self._dtype).flatten().clone()
        return split_flat(flat, [(group["numel"],) for group in self.param_groups])

    def set_prior(self, mean, precision) -> None:
        scalar = torch.as_tensor(precision).dim() == 0
        precisions = (
            (float(precision),) * len(self.param_groups) if scalar else self._split(precision)
        )
        for group, group_mean, group_precision in zip(self.param_groups, self._split(mean), precisions):
            group["prior_mean"] = group_mean
            group["weight_decay"] = group_precision / group["ess"]

    def set_duals(self, dual_mean, dual_precision, num_examples: int, temperature: float) -> None:
        scale = temperature / num_examples
        for group, dm, dp in zip(self.param_groups, self._split(dual_mean), self._split(dual_precision)):
            group["dual_mean"], group["dual_precision"] = scale * dm, scale * dp

    def _update(self):
        self.current_step += 1
        offset = 0
        for group in self.param_groups:
            group_slice = slice(offset, offset + group["numel"])
            offset += group["numel"]
            params = [p for p in group["params"] if p is not None]
            mean = flatten(params)
            wd, beta2 = group["weight_decay"], group["beta2"]
            group["momentum"] = self._new_momentum(
                self.state["avg_grad"][group_slice], group["momentum"], group["beta1"]
            )
            hess = group["hess"]
            data_hess = self._get_nll_hess(
                self.hess_approx, hess + wd, self.state["avg_nxg"], self.state["avg_gsq"], group_slice
            )
            hess_sample = data_hess * group["ess"] + group["dual_precision"]
            hess = (
                beta2 * hess
                + (1.0 - beta2) * hess_sample
                + (0.5 * (1 - beta2) ** 2) * (hess - hess_sample).square() / (hess + wd)
            )
            group["hess"] = hess
            debias = 1.0 - math.pow(group["beta1"], float(self.current_step)) if self.debias else 1.0
            lr = group["lr"] * (group["hess_init"] + wd) if self.rescale_lr else group["lr"]
            gradient = (
                group["momentum"] / debias
                + wd * (mean - group["prior_mean"])
                + group["dual_precision"] * mean
                - group["dual_mean"]
            )
            radius = group["clip_radius"]
            mean = mean - lr * torch.clip(gradient / (hess + wd), min=-radius, max=radius)
            for p, view in zip(params, split_flat(mean, [p.shape for p in params])):
                p.data = view
