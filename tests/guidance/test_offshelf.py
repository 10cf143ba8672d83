"""offshelf against EluCD's official code (AlexMaOLS/EluCD), one step worked by hand on the toy denoiser
(eps(x, t, y) = 0.5 x + 0.1 (y + 1) + t / 1000) and the linear classifier f(x0) = W flatten(x0)."""

import math

import pytest
import torch

from diffguide.errors import UserError
from diffguide.guidance.offshelf import OffTheShelfGuidance
from diffguide.samplers.ddim import DDIM
from diffguide.samplers.ddpm import DDPM

X = torch.tensor([[[[0.2, -0.3], [0.4, 0.1]]]])


def _expected_grad_x0(W, x0, y, t1, t2):
    """grad of t1 f_y - log sum_k exp(t2 f_k) for the linear classifier (design_cond_fn's `selected`)."""
    f = x0.flatten() @ W.T
    p = torch.softmax(t2 * f, 0)
    return (t1 * W[y] - t2 * (p[:, None] * W).sum(0)).view(1, 1, 2, 2)


def _posterior_variance(a_t, a_next):
    return (1 - a_next) / (1 - a_t) * (1 - a_t / a_next)


def test_ddim_form_is_condition_score_with_the_gradient_at_x0(toy, linear):
    """guided-diffusion's condition_score (EluCD DDPM/guided_diffusion/gaussian_diffusion.py, `condition_score`):
    eps = eps - (1 - alpha_bar).sqrt() * cond_fn(...), with cond_fn the gradient at pred_xstart (classifier_sample.py
    `design_cond_fn`: `pred_xstart.detach().requires_grad_(True)`, no backprop through the model)."""
    labels, t, t_next, s = torch.tensor([1]), 400, 200, 2.0
    guidance = OffTheShelfGuidance(linear, scale=s, temperature=1.5, marginal_temperature=0.5, schedule="constant",
                                   conditional_model=False)
    guidance.begin(toy, labels, [t, t_next])
    pred = DDIM(2, clip_x0=False)._finalize(toy, X, t, t_next, guidance(toy, X, t, labels))
    a = float(toy.alphas_cumprod[t])
    eps_u = 0.5 * X + 0.4  # null class, t / 1000 = 0.4
    x0 = (X - math.sqrt(1 - a) * eps_u) / math.sqrt(a)
    g = _expected_grad_x0(linear.weight, x0, 1, 1.5, 0.75)
    assert torch.allclose(pred.eps, eps_u - math.sqrt(1 - a) * s * g, atol=1e-5) and pred.nfe == 1
    assert torch.allclose(pred.x0, (X - math.sqrt(1 - a) * pred.eps) / math.sqrt(a), atol=1e-5)


def test_ancestral_step_is_elucds_p_sample(toy, linear):
    """EluCD's p_sample (gaussian_diffusion.py): `self.max_variance = max(self.max_variance, variance)`;
    `add_value = max(np.sin((current_time/self.num_timesteps)*np.pi)*self.max_variance*gamma_factor, 0.0)`;
    `out["mean"] + (out["variance"]+add_value)*gradient`, current_time the respaced index (N - 1 .. 0), N the
    number of respaced steps, and `sample = mean + exp(0.5 log_variance) noise`. The model is conditional
    (guided_sample.sh: --class_cond True) and its x0 clipped (clip_denoised) before the gradient is taken."""
    toy.data_range = (-1.0, 1.0)
    steps, labels, s, gamma = [900, 600, 300], torch.tensor([2]), 1.5, 0.3
    guidance = OffTheShelfGuidance(linear, scale=s, gamma=gamma)
    guidance.begin(toy, labels, steps)
    sampler = DDPM(3)
    x = torch.tensor([[[[2.5, -0.3], [0.4, -2.9]]]])
    z = torch.tensor([[[[0.3, -1.2], [0.7, 0.05]]]])
    a = {t: float(toy.alphas_cumprod[t]) for t in steps} | {-1: 1.0}
    var = {t: _posterior_variance(a[t], a[n]) for t, n in zip(steps, steps[1:] + [-1])}
    for k, (t, t_next) in enumerate(zip(steps, steps[1:] + [-1])):
        pred = sampler._finalize(toy, x, t, t_next, guidance(toy, x, t, labels))
        got = sampler.update(toy, x, t, t_next, pred, noise=lambda: z)
        eps_c = 0.5 * x + 0.3 + t / 1000
        x0 = ((x - math.sqrt(1 - a[t]) * eps_c) / math.sqrt(a[t])).clamp(-1, 1)
        mean = (math.sqrt(a[t_next]) * (1 - a[t] / a[t_next]) / (1 - a[t]) * x0
                + math.sqrt(a[t] / a[t_next]) * (1 - a[t_next]) / (1 - a[t]) * x)
        i = len(steps) - 1 - k
        add = max(math.sin(i / len(steps) * math.pi) * max(var[u] for u in steps[:k + 1]) * gamma, 0.0)
        g = _expected_grad_x0(linear.weight, x0, 2, 1.0, 0.5)
        expected = mean + (var[t] + add) * s * g + math.sqrt(var[t]) * z
        assert torch.allclose(got, expected, atol=1e-5), (t, got, expected)
        x = got


def test_the_classifier_move_survives_the_clip(toy, linear):
    """guided-diffusion clips the model's x0 (p_mean_variance, clip_denoised) and then applies the gradient term
    (condition_score recomputes pred_xstart from the shifted eps without clipping again): a pixel whose x0 is
    clipped to 1 still moves by (1 - a_t) / sqrt(a_t) s g."""
    toy.data_range = (-1.0, 1.0)
    labels, t, t_next, s = torch.tensor([1]), 500, 250, 3.0
    x = torch.tensor([[[[1.5, -0.3], [0.4, 1.9]]]])
    guidance = OffTheShelfGuidance(linear, scale=s, schedule="constant", conditional_model=False)
    guidance.begin(toy, labels, [t, t_next])
    pred = DDIM(2)._finalize(toy, x, t, t_next, guidance(toy, x, t, labels))
    a = float(toy.alphas_cumprod[t])
    x0 = ((x - math.sqrt(1 - a) * (0.5 * x + 0.5)) / math.sqrt(a)).clamp(-1, 1)
    assert (x0.abs() == 1).any()
    g = _expected_grad_x0(linear.weight, x0, 1, 1.0, 0.5)
    assert torch.allclose(pred.x0, x0 + (1 - a) / math.sqrt(a) * s * g, atol=1e-5)
    assert (pred.x0 > 1).any()


def test_gradient_through_the_denoiser_by_hand(toy, linear):
    """For the toy, x0_hat(x) = (x - sqrt(1-a)(0.5 x + c)) / sqrt(a): d x0 / d x = (1 - 0.5 sqrt(1-a)) / sqrt(a)."""
    labels, t = torch.tensor([0]), 700
    guidance = OffTheShelfGuidance(linear, scale=1.0, marginal_temperature=None, through_denoiser=True,
                                   schedule="constant", conditional_model=False)
    guidance.begin(toy, labels, [t])
    pred = DDIM(1, clip_x0=False)._finalize(toy, X, t, -1, guidance(toy, X, t, labels))
    a = float(toy.alphas_cumprod[t])
    eps_u = 0.5 * X + 0.7
    x0 = (X - math.sqrt(1 - a) * eps_u) / math.sqrt(a)
    g = _expected_grad_x0(linear.weight, x0, 0, 1.0, 1.0) * (1 - 0.5 * math.sqrt(1 - a)) / math.sqrt(a)
    assert torch.allclose(pred.eps, eps_u - math.sqrt(1 - a) * g, atol=1e-5) and pred.nfe == 2


def test_ddim_form_uses_elucds_step_scale(toy, linear):
    """This project's DDIM form: condition_score with s_t = s (Sigma_t + add_value) / Sigma_t, add_value as in
    EluCD's p_sample (respaced index i = 1 of N = 3 at the middle step, running max of Sigma)."""
    steps, labels = [900, 600, 300], torch.tensor([0])
    guidance = OffTheShelfGuidance(linear, scale=2.0, gamma=0.3, conditional_model=False)
    guidance.begin(toy, labels, steps)
    a = {t: float(toy.alphas_cumprod[t]) for t in steps} | {-1: 1.0}
    var = {t: _posterior_variance(a[t], a[n]) for t, n in zip(steps, steps[1:] + [-1])}
    add = math.sin(math.pi * 1 / 3) * max(var[900], var[600]) * 0.3
    pred = DDIM(3, clip_x0=False)._finalize(toy, X, 600, 300, guidance(toy, X, 600, labels))
    eps_u = 0.5 * X + 0.6
    x0 = (X - math.sqrt(1 - a[600]) * eps_u) / math.sqrt(a[600])
    g = _expected_grad_x0(linear.weight, x0, 0, 1.0, 0.5)
    expected = eps_u - math.sqrt(1 - a[600]) * 2.0 * (var[600] + add) / var[600] * g
    assert torch.allclose(pred.eps, expected, atol=1e-5)
    assert guidance.boost(300) == 0.0  # the last step: sin(0) = 0, where Sigma is 0 too


def test_edm_path_by_hand(toy, linear):
    """EluCD's edm_sampler (EDM/generate.py): x0 = x_cur / rms(x_cur) where rms > 1; grads of
    log[exp(t1 f_y) / sum exp(t2 f_k)] there; `current_guidance = (max_guidance/len(t_steps)) * (len(t_steps) -
    current_time)` (len(t_steps) = N + 1), plus `np.sin(current_time/interval * np.pi) * max_guidance * add_factor`;
    `grads = grads / grads_norm * x_cur_norm * current_guidance`; x_hat = x_cur + grads; the step from x_hat.
    x_cur is the EDM-coordinate state x_t / sqrt(a_t)."""
    steps, labels, s, gamma = [900, 600, 300], torch.tensor([1]), 0.004, 0.3
    guidance = OffTheShelfGuidance(linear, scale=s, path="edm", gamma=gamma, marginal_temperature=0.0,
                                   conditional_model=True)
    guidance.begin(toy, labels, steps)
    t, k = 600, 1
    x = torch.tensor([[[[0.9, -0.7], [0.4, 1.1]]]])
    a = float(toy.alphas_cumprod[t])
    x_cur = x / math.sqrt(a)
    rms = float(x_cur.pow(2).mean().sqrt())
    assert rms > 1
    g = linear.weight[1].view(1, 1, 2, 2)  # t2 = 0: the gradient of f_y alone
    c = s / 4 * (4 - k) + math.sin(k / 3 * math.pi) * s * gamma
    x_hat = math.sqrt(a) * (x_cur + g / g.pow(2).mean().sqrt() * rms * c)
    pred = guidance(toy, x, t, labels)
    assert torch.allclose(pred.x, x_hat, atol=1e-6)
    eps = 0.5 * x_hat + 0.2 + 0.6
    assert torch.allclose(pred.eps, eps, atol=1e-6)
    assert torch.allclose(pred.x0, (x_hat - math.sqrt(1 - a) * eps) / math.sqrt(a), atol=1e-5)
    # the sampler steps from x_hat: DDIM's update from (x_hat, x0, eps)
    x_next, _ = DDIM(3, clip_x0=False).sample(toy, guidance, x, labels)
    assert torch.isfinite(x_next).all()


def test_no_graph_survives_a_trajectory(toy, linear):
    guidance = OffTheShelfGuidance(linear, scale=1.0, through_denoiser=True)
    x, _ = DDIM(40, clip_x0=False).sample(toy, guidance, torch.randn(2, 1, 2, 2), torch.tensor([0, 1]))
    assert x.grad_fn is None and not x.requires_grad


def test_parameter_errors(linear):
    with pytest.raises(UserError, match="classifier=NAME"):
        OffTheShelfGuidance(None, 1.0)
    with pytest.raises(UserError, match="schedule"):
        OffTheShelfGuidance(linear, 1.0, schedule="cosine")
    with pytest.raises(UserError, match="path"):
        OffTheShelfGuidance(linear, 1.0, path="vp")
    with pytest.raises(UserError, match="temperature"):
        OffTheShelfGuidance(linear, 1.0, temperature=0.0)
