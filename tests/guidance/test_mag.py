"""MAG (diffguide/guidance/mag.py): worked by hand, against diffusers 0.42.1's guider, at its limits, and its refusals.

Conventions: every scale here is CFG's w (o_u + w (o_c - o_u); 1 = the conditional model), which is diffusers'
guidance_scale with its default use_original_formulation=False. The ToyDenoiser (tests/helpers.py) is an eps model:
eps(x, t, y) = 0.5 x + 0.1 (y + 1) + t / 1000, y = -1 for the null class, so eps_c - eps_u = 0.1 (y + 1) everywhere.
"""

import math

import pytest
import torch
from diffusers.guiders import MagnitudeAwareGuidance

from diffguide.guidance.cfg import CFG
from diffguide.guidance.mag import MAG, mag_output
from diffguide.models import gmm
from tests.helpers import (assert_refused_in_one_line, guidance_config, guider_prediction, network_outputs,
                           without_null_class)


def test_mag_by_hand(toy):
    """Zhu et al. 2025 (arXiv 2508.03442): r = ||o_c - o_u|| / ||o_u||, w_r = 1 + (w - 1) exp(-alpha r),
    o = o_u + w_r (o_c - o_u). t = 500, x = 0 on 2x2: eps_u = 0.5 everywhere, ||eps_u|| = 1.
      sample 0, y = 1: d = 0.2, ||d|| = 0.4, r = 0.4; w = 5, alpha = 2: w_r = 1 + 4 exp(-0.8); eps = 0.5 + 0.2 w_r
      sample 1, y = 0: d = 0.1, r = 0.2: w_r = 1 + 4 exp(-0.4); eps = 0.5 + 0.1 w_r"""
    x, labels = torch.zeros(2, 1, 2, 2), torch.tensor([1, 0])
    w_r = [1 + 4 * math.exp(-0.8), 1 + 4 * math.exp(-0.4)]
    expected = torch.tensor([0.5 + 0.2 * w_r[0], 0.5 + 0.1 * w_r[1]]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    pred = MAG(5.0, alpha=2.0)(toy, x, 500, labels)
    assert torch.allclose(pred.eps, expected, atol=1e-6)
    assert torch.allclose(pred.x0, toy.x0_from_eps(x, 500, expected), atol=1e-5)
    assert pred.nfe == 2 and toy.calls == [4]


@pytest.mark.parametrize("family", ["vp", "flow"])
@pytest.mark.parametrize("w, alpha", [(10.0, 8.0), (3.0, 0.5), (0.5, 2.0)])
def test_mag_equals_diffusers_guider(family, w, alpha):
    """diffusers 0.42.1 guiders/magnitude_aware_guidance.py:92-109 (`forward`) and :141-159 (`mambo_guidance`):
    guidance_scale = w, alpha = alpha, use_original_formulation=False; its True form is pred_cond +
    w' exp(-alpha r) d, the same at w' = w - 1. On the network's own output (eps; the flow mixture's velocity).
    The outputs go in as (batch, C, H W) (the norm is over every non-batch element either way): its
    torch.norm(x, dim=[1, 2, 3]) (line 150) raises "linalg.matrix_norm: dim must be a 2-tuple" on a 4-D image
    tensor under torch 2.14, so the guider as shipped only runs on 2-D or 3-D predictions (packed latents)."""
    model = gmm.image(num_classes=3, family=family)
    t = 600 if family == "vp" else 0.6
    x, labels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(6)), torch.tensor([0, 1, 2, 1])
    # (batch, C, H W): see the docstring
    cond, uncond = (out.flatten(2) for out in network_outputs(model, x, t, labels))
    ours = model.output(MAG(w, alpha=alpha)(model, x, t, labels), x, t).flatten(2)
    theirs = guider_prediction(MagnitudeAwareGuidance(guidance_scale=w, alpha=alpha), cond, uncond)
    assert torch.allclose(ours, theirs, atol=1e-5)
    guider = MagnitudeAwareGuidance(guidance_scale=w - 1, alpha=alpha, use_original_formulation=True)
    original = guider_prediction(guider, cond, uncond)
    assert torch.allclose(ours, original, atol=1e-5)
    assert not torch.allclose(ours, model.output(CFG(w)(model, x, t, labels), x, t).flatten(2), atol=1e-3)


def test_mag_limits(toy):
    """alpha = 0: w_r = w, CFG. w = 1: w_r = 1, the conditional model (one evaluation). o_c = o_u = 0: the
    prediction, not diffusers' 0/0 NaN."""
    x, labels = torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 2])
    assert torch.allclose(MAG(4.0, alpha=0.0)(toy, x, 300, labels).eps, CFG(4.0)(toy, x, 300, labels).eps, atol=1e-6)
    toy.calls.clear()
    pred = MAG(1.0, alpha=8.0)(toy, x, 300, labels)
    assert torch.allclose(pred.eps, toy.predict(x, 300, labels).eps) and pred.nfe == 1 and toy.calls[0] == 3
    zero = torch.zeros(2, 1, 2, 2)
    assert torch.equal(mag_output(zero, zero, 5.0, 8.0), zero)


@pytest.mark.parametrize("make", [lambda: MAG(2.0, alpha=-1.0), lambda: MAG(2.0, alpha=float("nan")),
                                  lambda: MAG(2.0, alpha=None), lambda: MAG(None)])
def test_bad_settings_are_refused_in_one_line(make):
    assert_refused_in_one_line(make, "")


def test_a_model_without_a_null_class_is_refused_in_one_line():
    assert_refused_in_one_line(lambda: MAG(2.0).check(without_null_class()), "null class")


def test_config_and_its_defaults():
    """conf/guidance/mag.yaml: w = 2 (cfg.yaml's default), alpha = 8 (diffusers' default); the global `scale` sets
    `scale`."""
    made = guidance_config("mag")
    assert isinstance(made, MAG) and (made.scale, made.alpha) == (2.0, 8.0) and made.schedule is None
