"""IVONADMM against stock IVON, against the spec-section-2 formulas by hand, and its accessors."""

import copy
import math

import ivon
import numpy as np
import pytest
import torch
from torch import nn

from task.ivon_admm import IVONADMM, effective_sample_size
from tests.ivon_admm_reference import ReferenceIVONADMM


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _param_groups(model: nn.Module) -> list[dict]:
    # Two groups with different learning rates exercise the per-group flat-vector split.
    return [
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters()), "lr": 0.02},
    ]


def _train(model, optimizer, steps: int) -> None:
    torch.manual_seed(1)
    inputs, targets = torch.randn(32, 4), torch.randint(0, 3, (32,))

    def closure():
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
        return loss

    for step in range(steps):
        # The same seed per step gives both optimizers the same noise draws.
        torch.manual_seed(100 + step)
        optimizer.step(closure)


def _assert_same_training(expected_model, expected, model, optimizer, steps: int = 20) -> None:
    """Train both on the same batches and noise; weights, hess and momentum must match bit for bit."""
    _train(expected_model, expected, steps)
    _train(model, optimizer, steps)
    for expected_param, param in zip(expected_model.parameters(), model.parameters()):
        assert torch.equal(expected_param, param)
    for expected_group, group in zip(expected.param_groups, optimizer.param_groups):
        assert torch.equal(expected_group["hess"], group["hess"])
        assert torch.equal(expected_group["momentum"], group["momentum"])


@pytest.mark.parametrize("mc_samples", [1, 2])
def test_reproduces_stock_ivon_bit_for_bit_without_prior_mean_or_duals(mc_samples):
    ess, prior_precision = 50.0, 3.0
    settings = dict(lr=0.1, ess=ess, hess_init=0.3, beta2=0.99, mc_samples=mc_samples)
    stock_model = _mlp()
    admm_model = copy.deepcopy(stock_model)
    stock = ivon.IVON(
        _param_groups(stock_model), weight_decay=prior_precision / ess, rescale_lr=False, **settings
    )
    admm = IVONADMM(_param_groups(admm_model), **settings)
    num_params = sum(p.numel() for p in admm_model.parameters())
    admm.set_prior(torch.zeros(num_params), prior_precision)
    admm.set_duals(torch.zeros(num_params), torch.zeros(num_params), num_examples=32, temperature=0.5)

    _assert_same_training(stock_model, stock, admm_model, admm)
    assert stock.current_step == admm.current_step == 20
    # The weights did move, so equality is not the trivial one.
    assert not torch.equal(admm_model[0].weight, _mlp()[0].weight)


def test_two_steps_match_the_spec_formulas_by_hand():
    # l(theta) = 1/2 theta^T A theta - b^T theta, so grad l = A theta - b; float64 throughout.
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    b = np.array([1.0, -1.0])
    ess, hess_init, beta1, beta2, lr = 10.0, 0.5, 0.9, 0.8, 0.3
    prior_mean, prior_precision = np.array([0.2, -0.1]), np.array([4.0, 6.0])
    dual_mean, dual_precision = np.array([3.0, -2.0]), np.array([5.0, -1.0])
    num_examples, temperature = 20, 0.5
    start = np.array([0.3, 0.7])

    theta = nn.Parameter(torch.tensor(start))
    optimizer = IVONADMM(
        [theta], lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2
    )
    optimizer.set_prior(prior_mean, prior_precision)
    optimizer.set_duals(dual_mean, dual_precision, num_examples, temperature)

    def closure():
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            loss = 0.5 * theta @ torch.tensor(A) @ theta - torch.tensor(b) @ theta
            loss.backward()
        return loss

    wd = prior_precision / ess
    dm = temperature * dual_mean / num_examples
    dp = temperature * dual_precision / num_examples
    m, h, momentum = start.copy(), np.full(2, hess_init), np.zeros(2)
    for step in (1, 2):
        torch.manual_seed(step)
        eps = torch.randn(2, dtype=torch.float64).numpy()
        sample = m + eps / np.sqrt(ess * (h + wd))
        grad = A @ sample - b
        hess_sample = ess * (h + wd) * (sample - m) * grad + dp
        momentum = beta1 * momentum + (1 - beta1) * grad
        h = beta2 * h + (1 - beta2) * hess_sample + 0.5 * (1 - beta2) ** 2 * (h - hess_sample) ** 2 / (h + wd)
        m = m - lr * (momentum / (1 - beta1**step) + wd * (m - prior_mean) + dp * m - dm) / (h + wd)

        torch.manual_seed(step)
        optimizer.step(closure)
        np.testing.assert_allclose(theta.detach().numpy(), m, rtol=1e-13)
        np.testing.assert_allclose(optimizer.param_groups[0]["hess"].numpy(), h, rtol=1e-13)
        np.testing.assert_allclose(optimizer.param_groups[0]["momentum"].numpy(), momentum, rtol=1e-13)
    posterior_mean, posterior_precision = optimizer.get_posterior()
    np.testing.assert_allclose(posterior_mean.numpy(), m, rtol=1e-13)
    np.testing.assert_allclose(posterior_precision.numpy(), ess * (h + wd), rtol=1e-13)


def test_posterior_round_trip_and_broadcast_zeroes_hess():
    model = _mlp().double()
    optimizer = IVONADMM(_param_groups(model), lr=0.1, ess=40.0)
    num_params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(3)
    prior_mean = torch.randn(num_params, generator=generator, dtype=torch.float64)
    prior_precision = 1.0 + torch.rand(num_params, generator=generator, dtype=torch.float64)
    mean = torch.randn(num_params, generator=generator, dtype=torch.float64)
    precision = 0.5 + torch.rand(num_params, generator=generator, dtype=torch.float64)

    optimizer.set_prior(prior_mean, prior_precision)
    optimizer.set_posterior(mean, precision)
    got_mean, got_precision = optimizer.get_posterior()
    assert torch.equal(got_mean, mean)
    torch.testing.assert_close(got_precision, precision, rtol=1e-14, atol=0)
    # The weights are a copy: changing the caller's vector leaves them alone.
    mean.add_(1.0)
    assert torch.equal(optimizer.get_posterior()[0], got_mean)
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), got_mean)

    # Spec section 5: with prior = posterior = the received global, IVON's hess is exactly 0.
    optimizer.set_prior(mean, precision)
    optimizer.set_posterior(mean, precision)
    for group in optimizer.param_groups:
        assert torch.equal(group["hess"], torch.zeros_like(group["hess"]))
    assert torch.equal(optimizer.get_posterior()[0], mean)


def _zero_loss_optimizer(prior_mean, prior_precision, duals, start, num_examples=10, **settings):
    theta = nn.Parameter(torch.tensor(start, dtype=torch.float64))
    optimizer = IVONADMM([theta], **settings)
    optimizer.set_prior(np.asarray(prior_mean, dtype=float), np.asarray(prior_precision, dtype=float))
    optimizer.set_duals(*duals, num_examples=num_examples, temperature=1.0)

    def closure():
        # No data term: the update is driven by the prior and the duals alone.
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            loss = 0.0 * theta.sum()
            loss.backward()
        return loss

    return theta, optimizer, closure


@pytest.mark.parametrize(
    "prior_mean, duals, start, direction",
    [
        ([1.0], ([0.0], [0.0]), [0.0], +1),  # the prior pulls the mean up to its mean 1
        ([-1.0], ([0.0], [0.0]), [0.0], -1),
        ([0.0], ([5.0], [0.0]), [0.0], +1),  # v > 0 is a linear reward for theta > 0
        ([0.0], ([-5.0], [0.0]), [0.0], -1),
        ([0.0], ([0.0], [5.0]), [1.0], -1),  # V > 0 is extra curvature towards 0
        ([0.0], ([0.0], [5.0]), [-1.0], +1),
    ],
)
def test_prior_and_dual_terms_move_the_mean_in_their_direction(prior_mean, duals, start, direction):
    theta, optimizer, closure = _zero_loss_optimizer(
        prior_mean, [2.0], duals, start, lr=0.1, ess=10.0, hess_init=1.0
    )
    optimizer.step(closure)
    assert direction * (theta.item() - start[0]) > 1e-3


def test_zero_data_loss_converges_to_the_exact_prior_plus_dual_solution():
    # Without data the client objective is Gaussian: rho S_k = rho S~ + V and
    # rho S_k m_k = rho S~ m~ + v (spec section 2 divided through; signs as in the IVON update).
    num_examples, temperature, rho = 10, 1.0, 0.5
    ess = effective_sample_size(num_examples, temperature, rho)
    prior_mean, prior_precision = np.array([0.5, -2.0, 1.0]), np.array([2.0, 3.0, 4.0])
    dual_mean, dual_precision = np.array([1.0, 2.0, -3.0]), np.array([1.5, -1.0, 0.0])
    theta, optimizer, closure = _zero_loss_optimizer(
        prior_mean, prior_precision, (dual_mean, dual_precision), [0.0, 0.0, 0.0],
        num_examples=num_examples, lr=0.5, ess=ess, hess_init=1.0, beta2=0.5,
    )
    for _ in range(200):
        optimizer.step(closure)

    expected_precision = prior_precision + dual_precision / rho
    expected_mean = (prior_precision * prior_mean + dual_mean / rho) / expected_precision
    mean, precision = optimizer.get_posterior()
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-10)
    np.testing.assert_allclose(precision.numpy(), expected_precision, rtol=1e-10)


def test_effective_sample_size_is_examples_over_temperature_times_rho():
    assert math.isclose(effective_sample_size(200, 0.1, 0.5), 4000.0)


def test_accessors_reject_invalid_precisions_and_wrong_lengths():
    optimizer = IVONADMM(_mlp().parameters(), lr=0.1, ess=10.0)
    num_params = sum(group["numel"] for group in optimizer.param_groups)
    with pytest.raises(ValueError):
        optimizer.set_prior(torch.zeros(num_params), 0.0)
    with pytest.raises(ValueError):
        optimizer.set_posterior(torch.zeros(num_params), -torch.ones(num_params))
    with pytest.raises(ValueError):
        optimizer.set_duals(torch.zeros(num_params - 1), torch.zeros(num_params - 1), 10, 1.0)


# ---------------------------------------------------------------------------- the in-place hot path
# IVONADMM keeps the weights in one flat buffer and updates in place (task/ivon_admm.py); these pin
# it to the plain implementation it replaced, and to stock IVON where stock has the same feature.


def _admm_terms(num_params: int, seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    return {
        "prior_mean": 0.1 * torch.randn(num_params, generator=generator),
        "prior_precision": 1.0 + torch.rand(num_params, generator=generator),
        "dual_mean": torch.randn(num_params, generator=generator),
        "dual_precision": torch.rand(num_params, generator=generator) - 0.3,
    }


@pytest.mark.parametrize("mc_samples", [1, 2])
def test_matches_the_reference_implementation_bit_for_bit_with_prior_and_duals(mc_samples):
    settings = dict(lr=0.1, ess=50.0, hess_init=0.3, beta2=0.99, mc_samples=mc_samples)
    reference_model = _mlp()
    model = copy.deepcopy(reference_model)
    reference = ReferenceIVONADMM(_param_groups(reference_model), **settings)
    optimizer = IVONADMM(_param_groups(model), **settings)
    terms = _admm_terms(sum(p.numel() for p in model.parameters()))
    for opt in (reference, optimizer):
        opt.set_prior(terms["prior_mean"], terms["prior_precision"])
        opt.set_duals(terms["dual_mean"], terms["dual_precision"], num_examples=32, temperature=0.5)

    _assert_same_training(reference_model, reference, model, optimizer)


@pytest.mark.parametrize(
    "settings",
    [dict(hess_approx="gradsq", mc_samples=2), dict(clip_radius=0.05), dict(rescale_lr=True)],
    ids=["gradsq", "clip", "rescale-lr"],
)
def test_reproduces_stock_ivon_bit_for_bit_with_other_stock_options(settings):
    ess, prior_precision = 50.0, 3.0
    common = {"lr": 0.1, "ess": ess, "hess_init": 0.3, "beta2": 0.99, "rescale_lr": False, **settings}
    stock_model = _mlp()
    admm_model = copy.deepcopy(stock_model)
    stock = ivon.IVON(_param_groups(stock_model), weight_decay=prior_precision / ess, **common)
    admm = IVONADMM(_param_groups(admm_model), weight_decay=prior_precision / ess, **common)

    _assert_same_training(stock_model, stock, admm_model, admm)


def test_state_assigned_from_outside_is_copied_in_and_never_written():
    # The BayesADMM client restores momentum and step from its saved state between rounds.
    stock_model = _mlp()
    admm_model = copy.deepcopy(stock_model)
    stock = ivon.IVON(_param_groups(stock_model), lr=0.1, ess=50.0, weight_decay=0.06, rescale_lr=False)
    admm = IVONADMM(_param_groups(admm_model), lr=0.1, ess=50.0, weight_decay=0.06)
    _train(stock_model, stock, steps=3)
    _train(admm_model, admm, steps=3)

    saved = admm.param_groups[0]["momentum"].numpy().copy()
    restored = torch.as_tensor(saved)  # shares memory with `saved`
    for opt in (stock, admm):
        opt.param_groups[0]["momentum"] = restored.clone() if opt is stock else restored
        opt.param_groups[1]["hess"] = torch.full_like(opt.param_groups[1]["hess"], 0.7)
    _train(stock_model, stock, steps=3)
    _train(admm_model, admm, steps=3)

    assert np.array_equal(saved, restored.numpy()) and admm.param_groups[0]["momentum"] is not restored
    for stock_param, admm_param in zip(stock_model.parameters(), admm_model.parameters()):
        assert torch.equal(stock_param, admm_param)
    for stock_group, admm_group in zip(stock.param_groups, admm.param_groups):
        assert torch.equal(stock_group["hess"], admm_group["hess"])


def test_weights_changed_from_outside_are_taken_in():
    model = _mlp()
    optimizer = IVONADMM(_param_groups(model), lr=0.1, ess=50.0)
    _train(model, optimizer, steps=2)
    # The parameters are views into the optimizer's flat buffer; both kinds of outside change
    # (an in-place copy and a new tensor) are seen by the next step.
    new_weight = torch.randn_like(model[0].weight)
    model[0].weight.data = new_weight.clone()
    with torch.no_grad():
        model[2].bias.copy_(torch.ones_like(model[2].bias))
    mean, _ = optimizer.get_posterior()
    expected = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(mean, expected)
    assert torch.equal(model[0].weight, new_weight)

    optimizer.set_posterior(expected, torch.full_like(expected, 2.0))
    assert torch.equal(optimizer.get_posterior()[0], expected)
    _train(model, optimizer, steps=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(optimizer.get_posterior()[0], expected)


def test_an_error_inside_sampled_params_leaves_the_mean_weights():
    model = _mlp()
    optimizer = IVONADMM(_param_groups(model), lr=0.1, ess=50.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ZeroDivisionError):
        with optimizer.sampled_params(train=True):
            assert not torch.equal(model[0].weight, before[0])  # a sample, not the mean
            1 / 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError, match="sampled_params"):
        optimizer.step()  # no gradient was collected
