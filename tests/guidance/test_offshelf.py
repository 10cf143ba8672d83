import math

import pytest
import torch

from diffguide.errors import UserError
from diffguide.guidance.offshelf import OffTheShelfGuidance
from diffguide.samplers.ddim import DDIM


def _expected_grad_x0(W, x0, y, t1, t2):
    f = x0.flatten() @ W.T
    p = torch.softmax(t2 * f, 0)
    return (t1 * W[y] - t2 * (p[:, None] * W).sum(0)).view(1, 1, 2, 2)


def test_gradient_with_respect_to_x0_by_hand(toy, linear):
    x, labels, t, s = torch.tensor([[[[0.2, -0.3], [0.4, 0.1]]]]), torch.tensor([1]), 400, 2.0
    guidance = OffTheShelfGuidance(linear, scale=s, temperature=1.5, marginal_temperature=0.5)
    guidance.start(toy, labels)
    pred = guidance(toy, x, t, labels)
    a = float(toy.alphas_cumprod[t])
    eps_u = 0.5 * x + 0.4  # null class, t / 1000 = 0.4
    x0 = (x - math.sqrt(1 - a) * eps_u) / math.sqrt(a)
    g = _expected_grad_x0(linear.weight, x0, 1, 1.5, 0.75)
    assert torch.allclose(pred.eps, eps_u - math.sqrt(1 - a) * s * g, atol=1e-5) and pred.nfe == 1


def test_gradient_through_the_denoiser_by_hand(toy, linear):
    """For the toy, x0_hat(x) = (x - sqrt(1-a)(0.5 x + c)) / sqrt(a): d x0 / d x = (1 - 0.5 sqrt(1-a)) / sqrt(a)."""
    x, labels, t = torch.tensor([[[[0.2, -0.3], [0.4, 0.1]]]]), torch.tensor([0]), 700
    guidance = OffTheShelfGuidance(linear, scale=1.0, marginal_temperature=None, through_denoiser=True)
    guidance.start(toy, labels)
    pred = guidance(toy, x, t, labels)
    a = float(toy.alphas_cumprod[t])
    eps_u = 0.5 * x + 0.7
    x0 = (x - math.sqrt(1 - a) * eps_u) / math.sqrt(a)
    g = _expected_grad_x0(linear.weight, x0, 0, 1.0, 1.0) * (1 - 0.5 * math.sqrt(1 - a)) / math.sqrt(a)
    assert torch.allclose(pred.eps, eps_u - math.sqrt(1 - a) * g, atol=1e-5) and pred.nfe == 2


def test_normalised_gradient_and_sine_schedule(toy, linear):
    x, labels, t = torch.tensor([[[[0.2, -0.3], [0.4, 0.1]]]]), torch.tensor([2]), 250
    guidance = OffTheShelfGuidance(linear, scale=1.0, normalize_gradient=True, schedule="elucd_sine", gamma=0.3)
    guidance.start(toy, labels)
    a_all = toy.alphas_cumprod.double()
    var = (1 - a_all[:-1]) / (1 - a_all[1:]) * (1 - a_all[1:] / a_all[:-1])
    var = torch.cat([var.new_zeros(1), var])
    expected_scale = 1 + 0.3 * float(var.max()) * math.sin(math.pi * t / 1000) / float(var[t])
    assert guidance.step_scale(toy, t) == pytest.approx(expected_scale)
    pred = guidance(toy, x, t, labels)
    a = float(toy.alphas_cumprod[t])
    eps_u = 0.5 * x + 0.25
    x0 = (x - math.sqrt(1 - a) * eps_u) / math.sqrt(a)
    g = _expected_grad_x0(linear.weight, x0, 2, 1.0, 0.5)
    g = g / g.pow(2).mean().sqrt()
    assert torch.allclose(pred.eps, eps_u - math.sqrt(1 - a) * expected_scale * g, atol=1e-5)


def test_no_graph_survives_a_trajectory(toy, linear):
    guidance = OffTheShelfGuidance(linear, scale=1.0, through_denoiser=True)
    x, _ = DDIM(40, clip_x0=False).sample(toy, guidance, torch.randn(2, 1, 2, 2), torch.tensor([0, 1]))
    assert x.grad_fn is None and not x.requires_grad


def test_parameter_errors(linear):
    with pytest.raises(UserError, match="classifier=NAME"):
        OffTheShelfGuidance(None, 1.0)
    with pytest.raises(UserError, match="schedule"):
        OffTheShelfGuidance(linear, 1.0, schedule="cosine")
    with pytest.raises(UserError, match="temperatures"):
        OffTheShelfGuidance(linear, 1.0, temperature=0.0)


def test_the_sine_schedule_uses_the_samplers_own_steps(toy, linear):
    """With the sampler's trajectory announced (begin), Sigma_t is the posterior variance of its respaced step, as in
    EluCD's respaced sampler: from t = 600 to the next timestep 300 here, its max over the trajectory."""
    guidance = OffTheShelfGuidance(linear, scale=2.0, schedule="elucd_sine", gamma=0.3)
    guidance.begin(toy, torch.tensor([0]), [900, 600, 300])
    a = {t: float(toy.alphas_cumprod[t]) for t in (900, 600, 300)}
    a[-1] = 1.0
    var = {t: (1 - a[n]) / (1 - a[t]) * (1 - a[t] / a[n]) for t, n in ((900, 600), (600, 300), (300, -1))}
    expected = 2.0 * (1 + 0.3 * max(var.values()) * math.sin(math.pi * 600 / 1000) / var[600])
    assert guidance.step_scale(toy, 600) == pytest.approx(expected)
