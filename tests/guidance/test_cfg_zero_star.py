import pytest
import torch
from diffusers.guiders import ClassifierFreeZeroStarGuidance

from diffguide.guidance.cfg_zero_star import CFGZeroStar
from diffguide.models import gmm
from diffguide.samplers.ddim import DDIM


def test_cfg_zero_star_by_hand(toy):
    x, labels, t = torch.tensor([[[[0.2, -0.4], [0.0, 0.6]]]]), torch.tensor([0]), 0
    guidance = CFGZeroStar(2.0, zero_init_steps=1)
    guidance.begin(toy, labels, [])
    first = guidance(toy, x, t, labels)
    assert torch.equal(first.eps, first.x0) and first.nfe == 0 and toy.calls == []
    eps_u, eps_c = 0.5 * x, 0.5 * x + 0.1  # t = 0, label 0: gap 0.1
    s = (eps_c * eps_u).sum() / (eps_u * eps_u).sum()
    expected = s * eps_u + 2.0 * (eps_c - s * eps_u)
    second = guidance(toy, x, t, labels)
    assert torch.allclose(second.eps, expected, atol=1e-6) and second.nfe == 2


@pytest.mark.parametrize("w, zero_steps", [(2.0, 1), (4.0, 2), (1.5, 0)])
def test_cfg_zero_star_equals_diffusers_over_steps(w, zero_steps):
    model = gmm.image(num_classes=3)
    labels = torch.tensor([0, 1, 2])
    ours = CFGZeroStar(w, zero_init_steps=zero_steps)
    ours.begin(model, labels, [])
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=zero_steps)
    gen = torch.Generator().manual_seed(0)
    for step, t in enumerate([900, 600, 300, 100]):
        x = torch.randn(3, 1, 8, 8, generator=gen)
        guider.set_state(step=step, num_inference_steps=4, timestep=torch.tensor(t))
        theirs = guider.forward(model.predict(x, t, labels).eps, model.predict(x, t, model.null_labels(labels)).eps).pred
        got = ours(model, x, t, labels)
        if step >= zero_steps:  # diffusers zeroes whatever the model predicts: eps here, not the flow velocity
            assert torch.allclose(got.eps, theirs, atol=1e-5), step
        else:
            assert got.nfe == 0 and torch.equal(got.x0, got.eps)


def test_zero_init_saves_evaluations_and_restarts_per_trajectory():
    model = gmm.image(num_classes=3)
    guidance, labels = CFGZeroStar(2.0, zero_init_steps=2), torch.tensor([0, 1])
    for _ in range(2):
        _, nfe = DDIM(10, clip_x0=False).sample(model, guidance, torch.randn(2, 1, 8, 8), labels)
        assert nfe == 2 * (10 - 2)


@pytest.mark.parametrize("clip", [False, True])
def test_zero_init_is_a_flow_euler_step_with_zero_velocity(clip):
    """CFG-Zero*'s official code (WeichenFan/CFG-Zero-star, its SD3/Flux pipelines) sets `noise_pred = noise_pred * 0`
    on the flow velocity for the first steps, then takes the scheduler's Euler step x + (sigma_next - sigma) v.
    In flow coordinates (x_f = x_t / (sqrt(a) + sqrt(1 - a)), sigma = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a))) our
    zero-init DDIM step must equal diffusers' FlowMatchEulerDiscreteScheduler step with model_output = 0, with or
    without pixel clipping; and the mixture's own velocity there is not zero (the step is not the model's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = gmm.image(num_classes=3)
    if clip:
        model.data_range = (-1.0, 1.0)
    labels, steps = torch.tensor([0, 1, 2]), [999, 959]
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    guidance = CFGZeroStar(2.0, zero_init_steps=1)
    sampler = DDIM(2, clip_x0=clip)
    guidance.begin(model, labels, steps)
    pred = sampler._finalize(model, x, 999, 959, guidance(model, x, 999, labels))
    x_next = sampler.update(model, x, 999, 959, pred, noise=None)

    def flow(x_vp, t):
        a = model.alpha(t)
        return x_vp / (a ** 0.5 + (1 - a) ** 0.5), (1 - a) ** 0.5 / (a ** 0.5 + (1 - a) ** 0.5)

    (x_f, sigma), (x_f_next, sigma_next) = flow(x, 999), flow(x_next, 959)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=[sigma, sigma_next], device="cpu")
    expected = scheduler.step(torch.zeros_like(x_f), scheduler.timesteps[0], x_f).prev_sample
    assert torch.allclose(x_f_next, expected, atol=1e-6)
    assert x_next.std() / x.std() == pytest.approx(1.0, abs=0.05)
    # the conditional model's own velocity at x_t is not zero: zero-init is a real change of the first step
    eps_c = model.predict(x, 999, labels).eps
    x0_c = model.x0_from_eps(x, 999, eps_c)
    assert (eps_c - x0_c).abs().max() > 0.1
