import math

import pytest
import torch

from diffguide.errors import UserError
from diffguide.guidance.universal import UniversalGuidance
from diffguide.samplers.ddim import DDIM

X = torch.tensor([[[[0.2, -0.3], [0.4, 0.1]]]])


def grad_log_softmax(W, z, y):
    """d/dz log softmax(W z)_y = W_y - sum_k p_k W_k, worked out for the linear classifier."""
    p = torch.softmax(z.flatten() @ W.T, 0)
    return (W[y] - (p[:, None] * W).sum(0)).view_as(z)


def toy_x0(toy, x, t, label):
    a = float(toy.alphas_cumprod[t])
    eps = 0.5 * x + 0.1 * (label + 1) + t / 1000
    return (x - math.sqrt(1 - a) * eps) / math.sqrt(a), eps, a


def begin(guidance, toy, timesteps, labels):
    guidance.begin(toy, labels, timesteps, noise=None)


def test_mean_guidance_iterates_on_x0_by_hand(toy, linear):
    g = UniversalGuidance(linear, scale=2.0, rho=0.0, mu=0.3, sigma=0.0, iter_steps=2, mu_schedule="constant")
    labels, t = torch.tensor([1]), 600
    begin(g, toy, [900, 600, 300], labels)
    pred = g(toy, X, t, labels)
    x0, eps, _ = toy_x0(toy, X, t, -1)  # the unconditional model
    mu = 2.0 * 0.3
    z1 = x0 + mu * grad_log_softmax(linear.weight, x0, 1)
    z2 = z1 + mu * grad_log_softmax(linear.weight, z1, 1)
    assert torch.allclose(pred.x0, x0, atol=1e-6) and torch.allclose(pred.eps, eps, atol=1e-6)
    assert torch.allclose(pred.x0_offset, z2 - x0, atol=1e-6) and pred.nfe == 1


def test_variance_guidance_backpropagates_through_the_model_by_hand(toy, linear):
    """For the toy, d x0 / d x_t = (1 - 0.5 sqrt(1 - a)) / sqrt(a); D_t is a move of x_t, i.e. x0 += D_t / sqrt(a)."""
    g = UniversalGuidance(linear, rho=0.7, mu=0.0, sigma=0.0, rho_schedule="constant", conditional_model=True)
    labels, t = torch.tensor([2]), 300
    begin(g, toy, [600, 300], labels)
    pred = g(toy, X, t, labels)
    x0, _, a = toy_x0(toy, X, t, 2)
    delta_t = 0.7 * grad_log_softmax(linear.weight, x0, 2) * (1 - 0.5 * math.sqrt(1 - a)) / math.sqrt(a)
    assert torch.allclose(pred.x0_offset, delta_t / math.sqrt(a), atol=1e-6) and pred.nfe == 2


def test_schedules_are_normalised_over_the_sampler_steps(toy, linear):
    g = UniversalGuidance(linear, rho=1.5, mu=0.5, sigma=0.2)
    steps = [900, 500, 100]
    begin(g, toy, steps, torch.tensor([0]))
    a = [float(toy.alphas_cumprod[t]) for t in steps] + [1.0]
    alpha = [a[i] / a[i + 1] for i in range(3)]
    assert g.strength(toy, 500, 1.5, "increase") == pytest.approx(1.5 * alpha[1] * 3 / sum(alpha))
    assert g.strength(toy, 900, 0.5, "decrease") == pytest.approx(0.5 * (1 - alpha[0]) * 3 / sum(1 - v for v in alpha))
    assert g.strength(toy, 100, 0.5, "constant") == pytest.approx(0.5)
    assert g.smoothing(toy, 500) == pytest.approx(0.2 * math.sqrt(1 - a[1]))


def test_a_ddim_step_is_tfgs_update(toy, linear):
    """x_prev = DDIM(x_t, x0) + D_t / sqrt(alpha_t) + sqrt(a_prev) D_0, TFG's reference update (eta = 0)."""
    g = UniversalGuidance(linear, rho=0.4, mu=0.2, sigma=0.0, iter_steps=3, rho_schedule="constant",
                          mu_schedule="constant")
    labels, t, t_prev = torch.tensor([0]), 700, 400
    sampler = DDIM(2, clip_x0=False)
    begin(g, toy, [t, t_prev], labels)
    pred = sampler._finalize(toy, X, t, t_prev, g(toy, X, t, labels))
    x_prev = sampler.update(toy, X, t, t_prev, pred, noise=None)
    x0, eps, a_t = toy_x0(toy, X, t, -1)
    a_prev = float(toy.alphas_cumprod[t_prev])
    d0, z = 0.0, x0.clone()
    for _ in range(3):
        z = z + 0.2 * grad_log_softmax(linear.weight, z, 0)
    d0 = z - x0
    dt = 0.4 * grad_log_softmax(linear.weight, x0, 0) * (1 - 0.5 * math.sqrt(1 - a_t)) / math.sqrt(a_t)
    expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps + dt / math.sqrt(a_t / a_prev) \
        + math.sqrt(a_prev) * d0
    assert torch.allclose(x_prev, expected, atol=1e-5)


def test_recurrence_renoises_and_repeats_the_step(toy, linear):
    """N = 2: step, back to level t with x_t = sqrt(alpha) x_prev + sqrt(1 - alpha) z, step again; NFE doubles."""
    g = UniversalGuidance(linear, rho=0.0, mu=0.3, sigma=0.0, iter_steps=1, recurrence=2, mu_schedule="constant")
    labels, steps = torch.tensor([1, 2]), DDIM(3, clip_x0=False)
    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    gens = [torch.Generator().manual_seed(10 + i) for i in range(2)]
    out, nfe = steps.sample(toy, g, x_T, labels, generators=gens)

    gens = [torch.Generator().manual_seed(10 + i) for i in range(2)]
    timesteps = steps.timesteps(toy)
    x = x_T
    for i, t in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t, a_next = float(toy.alphas_cumprod[t]), (float(toy.alphas_cumprod[t_next]) if t_next >= 0 else 1.0)
        for r in range(2):
            x0, eps, _ = toy_x0(toy, x, t, -1)
            z = torch.stack([x0[j] + 0.3 * grad_log_softmax(linear.weight, x0[j:j + 1], int(labels[j]))[0]
                             for j in range(2)])
            x_next = math.sqrt(a_next) * z + math.sqrt(1 - a_next) * eps
            if r == 0:
                noise = torch.stack([torch.randn((1, 2, 2), generator=gen) for gen in gens])
                x = math.sqrt(a_t / a_next) * x_next + math.sqrt(1 - a_t / a_next) * noise
        x = x_next
    assert torch.allclose(out, x, atol=1e-5) and nfe == 2 * len(timesteps)


def test_smoothing_draws_from_the_per_sample_noise(toy, linear):
    """With sigma > 0 the classifier sees x0 + s_t delta, delta from the sampler's noise source."""
    g = UniversalGuidance(linear, rho=0.0, mu=1.0, sigma=0.5, iter_steps=1, mc_samples=1, mu_schedule="constant",
                          sigma_schedule="constant")
    delta = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]])
    g.begin(toy, torch.tensor([1]), [500], noise=lambda: delta)
    pred = g(toy, X, 500, torch.tensor([1]))
    x0, _, _ = toy_x0(toy, X, 500, -1)
    assert torch.allclose(pred.x0_offset, grad_log_softmax(linear.weight, x0 + 0.5 * delta, 1), atol=1e-6)


def test_parameter_errors(linear):
    with pytest.raises(UserError, match="classifier=NAME"):
        UniversalGuidance(None)
    with pytest.raises(UserError, match="rho_schedule"):
        UniversalGuidance(linear, rho_schedule="cosine")
    with pytest.raises(UserError, match="recurrence"):
        UniversalGuidance(linear, recurrence=0)
    with pytest.raises(UserError, match="mu must be"):
        UniversalGuidance(linear, mu=-1.0)
