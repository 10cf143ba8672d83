"""TCFG (diffguide/guidance/tcfg.py): worked by hand, against diffusers 0.42.1's guider, at its limits, and its
refusals.

Conventions: every scale here is CFG's w (o_u + w (o_c - o_u); 1 = the conditional model), which is diffusers'
guidance_scale with its default use_original_formulation=False. The ToyDenoiser (tests/helpers.py) is an eps model:
eps(x, t, y) = 0.5 x + 0.1 (y + 1) + t / 1000, y = -1 for the null class, so eps_c - eps_u = 0.1 (y + 1) everywhere.
"""

import pytest
import torch
from diffusers.guiders import TangentialClassifierFreeGuidance
from diffusers.guiders.tangential_classifier_free_guidance import normalized_guidance

from diffguide.guidance.cfg import CFG
from diffguide.guidance.tcfg import TCFG, tangential_damping, tcfg_output
from diffguide.models import gmm
from tests.helpers import (assert_refused_in_one_line, guidance_config, guider_prediction, network_outputs,
                           without_null_class)


def test_tcfg_by_hand_two_pixel_svd(toy):
    """Kwon et al. 2025 (arXiv 2503.18137): o_u' = (o_u . v_1) v_1 with v_1 the top right singular vector of
    A = [o_c; o_u], then o_u' + w (o_c - o_u').

    By hand, for 2-pixel samples: when ||o_c|| = ||o_u|| = sqrt(n) and m = o_c . o_u > 0, A A^T = [[n, m], [m, n]] has
    the eigenvectors (1, 1)/sqrt(2) (eigenvalue n + m, the larger) and (1, -1)/sqrt(2), so v_1 = A^T (1, 1) / norm =
    (o_c + o_u) / ||o_c + o_u||, and o_u . (o_c + o_u) = m + n = ||o_c + o_u||^2 / 2: o_u' = (o_c + o_u) / 2.
    At t = 0, eps_u = 0.5 x and eps_c = 0.5 x + 0.1 (y + 1):
      sample 0, y = 1, x = (1.8, -2.2): o_u = (0.9, -1.1), o_c = (1.1, -0.9) (both norms^2 2.02, m = 1.98):
        o_u' = (1.0, -1.0); w = 3: (1.0, -1.0) + 3 (0.1, 0.1) = (1.3, -0.7)   [CFG: (1.5, -0.5)]
      sample 1, y = 0, x = (1.0, -1.2): o_u = (0.5, -0.6), o_c = (0.6, -0.5) (norms^2 0.61, m = 0.6):
        o_u' = (0.55, -0.55); w = 3: (0.55, -0.55) + 3 (0.05, 0.05) = (0.7, -0.4)"""
    x = torch.tensor([[[[1.8, -2.2]]], [[[1.0, -1.2]]]])
    labels = torch.tensor([1, 0])
    cond, uncond = toy.predict(x, 0, labels).eps, toy.predict(x, 0, toy.null_labels(labels)).eps
    assert torch.allclose(tangential_damping(cond, uncond), torch.tensor([[[[1.0, -1.0]]], [[[0.55, -0.55]]]]),
                          atol=1e-6)
    pred = TCFG(3.0)(toy, x, 0, labels)
    expected = torch.tensor([[[[1.3, -0.7]]], [[[0.7, -0.4]]]])
    assert torch.allclose(pred.eps, expected, atol=1e-6)
    assert torch.allclose(pred.x0, toy.x0_from_eps(x, 0, expected), atol=1e-5)
    assert pred.nfe == 2 and toy.calls == [2, 2, 4], "one batched forward (after the two direct calls above)"
    assert not torch.allclose(pred.eps, CFG(3.0)(toy, x, 0, labels).eps, atol=1e-3)


@pytest.mark.parametrize("family", ["vp", "flow"])
@pytest.mark.parametrize("w", [0.5, 3.0, 7.5])
def test_tcfg_equals_diffusers_guider(family, w):
    """diffusers 0.42.1 guiders/tangential_classifier_free_guidance.py:89-100 (`forward`) and :132-151
    (`normalized_guidance`): guidance_scale = w, use_original_formulation=False, on the network's own output (eps of
    the vp mixture, the velocity of the flow one). Its `is_conditional` (line 104) reads the undefined
    `_num_outputs_prepared` (AttributeError): only `set_state` and `forward` are used, which never touch it."""
    model = gmm.image(num_classes=3, family=family)
    t = 600 if family == "vp" else 0.6
    x, labels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    cond, uncond = network_outputs(model, x, t, labels)
    ours = model.output(TCFG(w)(model, x, t, labels), x, t)
    theirs = guider_prediction(TangentialClassifierFreeGuidance(guidance_scale=w), cond, uncond)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(tcfg_output(cond, uncond, w), normalized_guidance(cond, uncond, w), atol=1e-5)
    # use_original_formulation=True is Ho & Salimans' form: its w is ours minus one
    guider = TangentialClassifierFreeGuidance(guidance_scale=w - 1, use_original_formulation=True)
    original = guider_prediction(guider, cond, uncond)
    assert torch.allclose(ours, original, atol=1e-5)


def test_tcfg_at_one_is_the_conditional_model(toy):
    """o_u' + 1 (o_c - o_u') = o_c whatever o_u' is: the formula, and the method (one evaluation)."""
    x, labels = torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 2])
    cond, uncond = toy.predict(x, 400, labels).eps, toy.predict(x, 400, toy.null_labels(labels)).eps
    assert torch.allclose(tcfg_output(cond, uncond, 1.0), cond, atol=1e-6)
    toy.calls.clear()
    pred = TCFG(1.0)(toy, x, 400, labels)
    assert torch.allclose(pred.eps, cond, atol=1e-6) and pred.nfe == 1 and toy.calls == [3]


@pytest.mark.parametrize("make", [lambda: TCFG(float("nan")), lambda: TCFG(None), lambda: TCFG(2.0, schedule="steep")])
def test_bad_settings_are_refused_in_one_line(make):
    assert_refused_in_one_line(make, "")


def test_a_model_without_a_null_class_is_refused_in_one_line():
    assert_refused_in_one_line(lambda: TCFG(2.0).check(without_null_class()), "null class")


def test_config_and_its_defaults():
    """conf/guidance/tcfg.yaml: w = 2 (cfg.yaml's default); the global `scale` sets `scale`."""
    made = guidance_config("tcfg")
    assert isinstance(made, TCFG) and made.scale == 2.0 and made.schedule is None
