"""APG-mix: CFG on the first cfg_steps steps, APG after them, the momentum buffer fed on every step; worked by hand
and checked against diffusers' AdaptiveProjectedMixGuidance (diffusers 0.42.1,
guiders/adaptive_projected_guidance_mix.py)."""

import math

import pytest
import torch
from diffusers.guiders import AdaptiveProjectedMixGuidance
from diffusers.guiders.adaptive_projected_guidance_mix import MomentumBuffer
from omegaconf import OmegaConf

from diffguide.command.config import CONF_DIR
from diffguide.errors import UserError
from diffguide.guidance.apg import APG
from diffguide.guidance.apg_mix import APGMix
from diffguide.guidance.cfg import CFG
from diffguide.models import gmm
from diffguide.samplers.ddim import DDIM
from diffguide.samplers.dpmpp_2s_a import DPMSolverPP2SAncestral


def _toy_x0(toy, x, t):
    """The toy denoiser's D_u and D_c (labels = 2): eps_u = 0.5 x + t / 1000, eps_c = eps_u + 0.3."""
    a = float(toy.alphas_cumprod[t])
    eps_u = 0.5 * x + t / 1000
    eps_c = eps_u + 0.3
    return (x - math.sqrt(1 - a) * eps_u) / math.sqrt(a), (x - math.sqrt(1 - a) * eps_c) / math.sqrt(a)


def test_cfg_step_then_apg_step_by_hand(toy):
    """Two steps, cfg_steps = 1: step 0 is CFG with w_cfg = 2.5 (D_u + 2.5 (D_c - D_u)); step 1 is APG with w = 3,
    eta = 0.5, r = 0.1, beta = -0.5, whose momentum already holds step 0's difference: m = diff_1 - 0.5 diff_0."""
    labels, levels = torch.tensor([2]), [600, 100]
    x0 = torch.tensor([[[[0.3, -0.1], [0.2, 0.0]]]])
    x1 = torch.tensor([[[[0.1, 0.4], [-0.2, 0.5]]]])
    guidance = APGMix(3.0, cfg_scale=2.5, cfg_steps=1, eta=0.5, norm_threshold=0.1, momentum=-0.5)
    guidance.begin(toy, labels, levels)

    d_u0, d_c0 = _toy_x0(toy, x0, 600)
    expected0 = d_u0 + 2.5 * (d_c0 - d_u0)
    pred0 = guidance(toy, x0, 600, labels)
    assert not guidance.is_apg(toy, 600) and pred0.nfe == 2
    assert torch.allclose(pred0.x0, expected0, atol=1e-5)
    assert torch.allclose(pred0.eps, toy.eps_from_x0(x0, 600, expected0), atol=1e-5)

    d_u1, d_c1 = _toy_x0(toy, x1, 100)
    m = (d_c1 - d_u1) + (-0.5) * (d_c0 - d_u0)
    m = m * min(1.0, 0.1 / m.norm().item())
    unit = d_c1 / d_c1.norm()
    par = (m * unit).sum() * unit
    expected1 = d_c1 + 2.0 * ((m - par) + 0.5 * par)
    pred1 = guidance(toy, x1, 100, labels)
    assert guidance.is_apg(toy, 100) and pred1.nfe == 2
    assert torch.allclose(pred1.x0, expected1, atol=1e-6)
    assert torch.allclose(pred1.eps, toy.eps_from_x0(x1, 100, expected1), atol=1e-5)


@pytest.mark.parametrize("cfg_steps", [0, 3, 7])
def test_equals_diffusers_original_formulation_over_a_trajectory(cfg_steps):
    """Mapping: use_original_formulation=True, guidance_scale = cfg_scale - 1, adaptive_projected_guidance_scale =
    scale - 1, adaptive_projected_guidance_start_step = cfg_steps - 1 (its rule: APG where step > start_step,
    line 187), rescale = norm_threshold; predictions are x0 (in float64: in float32 the division by alpha amplifies
    eps' rounding to 2e-5 at t = 900), the guider's state set per step. Its momentum buffer is
    fed on the CFG steps too (lines 123-125), and so is ours: the APG steps agree only because of it."""
    model = gmm.image(num_classes=3)
    labels = torch.tensor([0, 1, 2])
    timesteps = [900, 750, 600, 450, 300, 150, 50]
    ours = APGMix(4.0, cfg_scale=2.5, cfg_steps=cfg_steps, eta=0.3, norm_threshold=2.5, momentum=-0.75)
    ours.begin(model, labels, timesteps)
    guider = AdaptiveProjectedMixGuidance(guidance_scale=1.5, adaptive_projected_guidance_scale=3.0,
                                          adaptive_projected_guidance_momentum=-0.75,
                                          adaptive_projected_guidance_rescale=2.5, eta=0.3,
                                          use_original_formulation=True,
                                          adaptive_projected_guidance_start_step=cfg_steps - 1)
    guider.momentum_buffer = MomentumBuffer(-0.75)  # what its prepare_inputs does at step 0 (lines 92-94)
    gen = torch.Generator().manual_seed(0)
    for step, t in enumerate(timesteps):
        x = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)  # float64: see the docstring
        guider.set_state(step=step, num_inference_steps=len(timesteps), timestep=torch.tensor(t))
        assert guider._is_apg_enabled() == ours.is_apg(model, t) == (step >= cfg_steps), step
        x0_c = model.x0_from_eps(x, t, model.predict(x, t, labels).eps)
        x0_u = model.x0_from_eps(x, t, model.predict(x, t, model.null_labels(labels)).eps)
        theirs = guider.forward(x0_c, x0_u).pred
        assert torch.allclose(ours(model, x, t, labels).x0, theirs, rtol=0, atol=1e-10), step
        if step == cfg_steps > 0:  # a buffer fed on the APG steps only would start here from zero: not diffusers'
            fresh = APG(4.0, eta=0.3, norm_threshold=2.5, momentum=-0.75)
            fresh.begin(model, labels, timesteps)
            assert not torch.allclose(fresh(model, x, t, labels).x0, theirs, rtol=0, atol=1e-3)


def _sample(guidance, sampler=None, steps=8):
    model = gmm.image(num_classes=3)
    labels = torch.tensor([0, 1, 2])
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sampler = sampler or DDIM(steps, clip_x0=False)
    generators = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    return sampler.sample(model, guidance, x_T, labels, generators)


def test_limits_are_apg_and_cfg():
    """cfg_steps = 0 is APG throughout (same momentum, same images); cfg_steps >= the step count is CFG throughout."""
    settings = dict(eta=0.2, norm_threshold=1.0, momentum=-0.5)
    mix, nfe = _sample(APGMix(3.0, cfg_steps=0, **settings))
    apg, _ = _sample(APG(3.0, **settings))
    assert torch.equal(mix, apg) and nfe == 16
    mix, _ = _sample(APGMix(3.0, cfg_scale=2.0, cfg_steps=8, **settings))
    cfg, _ = _sample(CFG(2.0))
    assert torch.equal(mix, cfg)


def test_cfg_scale_null_is_scale_and_scale_one_is_conditional(toy):
    labels, x = torch.tensor([0, 1]), torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    same, explicit = APGMix(3.0, cfg_steps=1), APGMix(3.0, cfg_scale=3.0, cfg_steps=1)
    for g in (same, explicit):
        g.begin(toy, labels, [800, 400])
    assert torch.equal(same(toy, x, 800, labels).x0, explicit(toy, x, 800, labels).x0)
    conditional = APGMix(1.0, cfg_scale=1.0, cfg_steps=1)
    conditional.begin(toy, labels, [800, 400])
    for t in (800, 400):
        assert torch.allclose(conditional(toy, x, t, labels).eps, toy.predict(x, t, labels).eps, atol=1e-5), t


def test_midpoint_evaluations_follow_their_step():
    """DPM-Solver++(2S) evaluates between two levels: the switch is by noise level, so it runs (no step index lookup)
    and a midpoint of a CFG step is CFG."""
    model = gmm.image(num_classes=3)
    mix = APGMix(3.0, cfg_steps=2)
    levels = DPMSolverPP2SAncestral(5).levels(model)
    mix.begin(model, torch.tensor([0]), levels)
    between = model.schedule.at_sigma((levels[0].sigma * levels[1].sigma) ** 0.5)
    assert not mix.is_apg(model, between) and mix.is_apg(model, levels[2]) and not mix.is_apg(model, levels[1])
    x, nfe = _sample(APGMix(3.0, cfg_steps=2), DPMSolverPP2SAncestral(5))
    assert torch.isfinite(x).all() and nfe > 0


def test_config_instantiates_with_apg_defaults():
    node = OmegaConf.load(CONF_DIR / "guidance" / "apg_mix.yaml")
    apg = OmegaConf.load(CONF_DIR / "guidance" / "apg.yaml")
    assert (node.eta, node.norm_threshold, node.momentum) == (apg.eta, apg.norm_threshold, apg.momentum)
    node.scale = 4.0
    guidance = APGMix(**{k: v for k, v in OmegaConf.to_container(node).items() if k != "_target_"})
    assert guidance.cfg_steps == 6 and guidance.cfg_scale is None and guidance.schedule is None


@pytest.mark.parametrize("make", [lambda: APGMix(2.0, cfg_steps=-1), lambda: APGMix(2.0, cfg_steps=2.5),
                                  lambda: APGMix(2.0, cfg_steps=True), lambda: APGMix(2.0, norm_threshold=-1),
                                  lambda: APGMix(2.0, cfg_scale=float("nan")), lambda: APGMix(None)])
def test_parameter_errors(make):
    with pytest.raises(UserError) as err:
        make()
    assert "\n" not in str(err.value)
