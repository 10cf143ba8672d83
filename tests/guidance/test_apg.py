"""Adaptive projected guidance (diffguide/guidance/apg.py): against its formula, and against diffusers where it has
one."""

import math

import pytest
import torch
from diffusers.guiders import AdaptiveProjectedGuidance
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer
from diffguide.errors import UserError
from diffguide.guidance.apg import APG
from diffguide.models import gmm


def test_apg_defaults_have_their_stated_sources():
    """eta = 0 (the paper's recommendation), beta = -0.5 and SDXL's r = 15 (the paper's Table 10 as METHODS.md's
    port quotes it), r rescaled to the same per-element RMS on 1x28x28 images: 15 * sqrt(784 / (4 * 128 * 128))."""
    apg = APG(2.0)
    assert apg.eta == 0.0 and apg.momentum == -0.5
    assert apg.norm_threshold == pytest.approx(15 * math.sqrt(784 / (4 * 128 * 128)), abs=0.005)


def test_apg_by_hand_one_step(toy):
    """w = 3, eta = 0.5, r = 0.1, no momentum, worked on a 4-pixel sample."""
    x, labels, t = torch.tensor([[[[0.3, -0.1], [0.2, 0.0]]]]), torch.tensor([2]), 100
    a = float(toy.alphas_cumprod[t])
    eps_u = 0.5 * x + 0.1
    eps_c = 0.5 * x + 0.1 + 0.3
    d_u, d_c = (x - math.sqrt(1 - a) * eps_u) / math.sqrt(a), (x - math.sqrt(1 - a) * eps_c) / math.sqrt(a)
    diff = d_c - d_u  # = -0.3 sqrt(1-a)/sqrt(a) everywhere
    diff = diff * min(1.0, 0.1 / diff.norm().item())
    unit = d_c / d_c.norm()
    par = (diff * unit).sum() * unit
    expected = d_c + 2.0 * ((diff - par) + 0.5 * par)
    pred = APG(3.0, eta=0.5, norm_threshold=0.1, momentum=0.0)(toy, x, t, labels)
    assert torch.allclose(pred.x0, expected, atol=1e-6)
    assert torch.allclose(pred.eps, toy.eps_from_x0(x, t, expected), atol=1e-5)


def test_apg_equals_diffusers_original_formulation_over_steps_with_momentum():
    model = gmm.image(num_classes=3)
    labels = torch.tensor([0, 1, 2])
    ours = APG(4.0, eta=0.3, norm_threshold=2.5, momentum=-0.75)
    ours.begin(model, labels, [])
    guider = AdaptiveProjectedGuidance(guidance_scale=3.0, adaptive_projected_guidance_momentum=-0.75,
                                       adaptive_projected_guidance_rescale=2.5, eta=0.3,
                                       use_original_formulation=True)
    guider.momentum_buffer = MomentumBuffer(-0.75)
    gen = torch.Generator().manual_seed(0)
    for step, t in enumerate([900, 700, 500, 300]):
        x = torch.randn(3, 1, 8, 8, generator=gen)
        guider.set_state(step=step, num_inference_steps=4, timestep=torch.tensor(t))
        x0_c = model.x0_from_eps(x, t, model.predict(x, t, labels).eps)
        x0_u = model.x0_from_eps(x, t, model.predict(x, t, model.null_labels(labels)).eps)
        theirs = guider.forward(x0_c, x0_u).pred
        assert torch.allclose(ours(model, x, t, labels).x0, theirs, atol=1e-5), step


def test_apg_at_scale_one_is_the_conditional_model(toy):
    x, labels = torch.randn(2, 1, 2, 2), torch.tensor([0, 1])
    pred = APG(1.0)(toy, x, 400, labels)
    assert torch.allclose(pred.eps, toy.predict(x, 400, labels).eps, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: APG(2.0, norm_threshold=-1)])
def test_parameter_errors(make):
    with pytest.raises(UserError):
        make()
