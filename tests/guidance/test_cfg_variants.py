"""cfg_rescale, cfg_interval, apg and adaptive: each against its formula, and against diffusers where it has one."""

import math

import pytest
import torch
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

from diffguide.errors import UserError
from diffguide.guidance.adaptive import AdaptiveGuidance
from diffguide.guidance.apg import APG
from diffguide.guidance.cfg import CFG
from diffguide.guidance.cfg_interval import CFGInterval
from diffguide.guidance.cfg_rescale import CFGRescale
from diffguide.models import gmm
from diffguide.samplers.ddim import DDIM


def test_cfg_rescale_by_hand(toy):
    x = torch.tensor([[[[0.0, 0.2], [0.4, 0.6]]]])
    pred = CFGRescale(3.0, phi=0.5)(toy, x, 0, torch.tensor([1]))
    eps_c = 0.5 * x + 0.2
    eps_cfg = 0.5 * x + 0.0 + 3.0 * 0.2  # eps_u = 0.5 x; eps_c - eps_u = 0.2
    # std(eps_c) = std(eps_cfg) = 0.5 std(x): the rescale factor is exactly 1 here, so phi changes nothing
    assert torch.allclose(pred.eps, eps_cfg, atol=1e-6)
    x2 = torch.tensor([[[[0.0, 0.0], [0.0, 0.8]]]])
    pred2 = CFGRescale(3.0, phi=0.5)(toy, x2, 0, torch.tensor([1]))
    eps_cfg2 = 0.5 * x2 + 0.6
    assert torch.allclose(pred2.eps, eps_cfg2, atol=1e-6), "a constant shift leaves the std alone"
    assert pred.nfe == 2 and eps_c.shape == pred.eps.shape


@pytest.mark.parametrize("w, phi", [(2.0, 0.7), (5.0, 1.0), (3.0, 0.0)])
def test_cfg_rescale_equals_diffusers(w, phi):
    model = gmm.image(num_classes=3)
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    ours = CFGRescale(w, phi)(model, x, 600, labels).eps
    guider = ClassifierFreeGuidance(guidance_scale=w, guidance_rescale=phi)
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(600))
    theirs = guider.forward(model(x, 600, labels), model(x, 600, model.null_labels(labels))).pred
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_cfg_interval_guides_only_inside_and_saves_evaluations(toy):
    guidance = CFGInterval(3.0, sigma_lo=0.5, sigma_hi=2.0)
    x, labels = torch.randn(2, 1, 2, 2), torch.tensor([0, 1])
    for t in range(0, 1000, 37):
        sigma = toy.sigma(t)
        pred = guidance(toy, x, t, labels)
        inside = 0.5 < sigma <= 2.0
        expected = CFG(3.0)(toy, x, t, labels).eps if inside else toy(x, t, labels)
        assert torch.allclose(pred.eps, expected) and pred.nfe == (2 if inside else 1), (t, sigma)
    sampler = DDIM(20, clip_x0=False)
    _, nfe = sampler.sample(toy, guidance, torch.randn(2, 1, 2, 2), labels)
    inside_steps = sum(0.5 < toy.sigma(t) <= 2.0 for t in sampler.timesteps(toy))
    assert 0 < inside_steps < 20 and nfe == 20 + inside_steps


def test_cfg_interval_presets_are_the_papers_table_1():
    """Kynkaanniemi et al. 2024, Table 1 (ImageNet-512, FID presets): EDM2-XXL guides sigma in (0.19, 1.61] at
    w = 2.0; EDM2-S guides (0.28, 2.90]. The default is EDM2-XXL's; explicit bounds replace a preset's."""
    xxl, small = CFGInterval(2.0), CFGInterval(2.0, interval="edm2_s")
    assert (xxl.sigma_lo, xxl.sigma_hi) == (0.19, 1.61)
    assert (small.sigma_lo, small.sigma_hi) == (0.28, 2.90)
    custom = CFGInterval(2.0, interval="edm2_s", sigma_lo=0.5)
    assert (custom.sigma_lo, custom.sigma_hi) == (0.5, 2.90)


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
        x0_c = model.x0_from_eps(x, t, model(x, t, labels))
        x0_u = model.x0_from_eps(x, t, model(x, t, model.null_labels(labels)))
        theirs = guider.forward(x0_c, x0_u).pred
        assert torch.allclose(ours(model, x, t, labels).x0, theirs, atol=1e-5), step


def test_apg_at_scale_one_is_the_conditional_model(toy):
    x, labels = torch.randn(2, 1, 2, 2), torch.tensor([0, 1])
    pred = APG(1.0)(toy, x, 400, labels)
    assert torch.allclose(pred.eps, toy(x, 400, labels), atol=1e-5)


def test_adaptive_switches_per_sample_once_predictions_agree(toy):
    """The toy's eps_c - eps_u = 0.1 (y + 1) is a constant shift. Sample 0: a large x and a gap of 0.1, so eps_c
    and eps_u agree at once (cosine above 0.999). Sample 1: eps_u = 0.5 x + t/1000 alternates in sign around zero
    and the gap is 0.3: cosine 0.857 at t = 500 and 0.837 at t = 400, so it stays guided.
    The switch takes effect at the step whose cosine first exceeds gamma (the policy of Castillo et al.,
    arXiv 2312.12487, as the audit read it): sample 0's first step is already the conditional one, at 2 NFE."""
    guidance = AdaptiveGuidance(2.0, gamma=0.999)
    labels = torch.tensor([0, 2])
    x = torch.stack([torch.tensor([[[40.0, 50.0], [50.0, 50.0]]]), torch.tensor([[[-2.0, 0.0], [-2.0, 0.0]]])])
    guidance.begin(toy, labels, [])
    first = guidance(toy, x, 500, labels)
    assert first.nfe.tolist() == [2.0, 2.0]
    assert torch.allclose(first.eps[0], toy(x, 500, labels)[0])
    assert torch.allclose(first.eps[1], CFG(2.0)(toy, x, 500, labels).eps[1])
    second = guidance(toy, x, 400, labels)
    assert second.nfe.tolist() == [1.0, 2.0]
    assert torch.allclose(second.eps[0], toy(x, 400, labels)[0])
    assert torch.allclose(second.eps[1], CFG(2.0)(toy, x, 400, labels).eps[1])


def test_adaptive_in_x0_space_compares_the_denoised_estimates(toy):
    """x0_c - x0_u = -sqrt(1 - a) / sqrt(a) * 0.1 (y + 1) for the toy: worked out, the cosine of x0_c and x0_u for
    sample x = [[1, -1], [2, 0]], y = 1 at t = 500 decides the switch either side of it."""
    x, labels, t = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]]), torch.tensor([1]), 500
    a = float(toy.alphas_cumprod[t])
    x0 = lambda y_shift: (x - (1 - a) ** 0.5 * (0.5 * x + y_shift + t / 1000)) / a ** 0.5
    cos = float(torch.nn.functional.cosine_similarity(x0(0.2).flatten(1), x0(0.0).flatten(1)))
    assert cos < 0.99  # far from the eps-space cosine: the test tells the two spaces apart
    for gamma, switched in ((cos - 1e-4, True), (min(cos + 1e-4, 1.0), False)):
        guidance = AdaptiveGuidance(2.0, gamma=gamma, space="x0")
        guidance.begin(toy, labels, [])
        guidance(toy, x, t, labels)
        assert bool(guidance._switched_off[0]) is switched


def test_adaptive_reports_per_sample_savings_through_the_sampler():
    model = gmm.image(num_classes=3, std=0.2)
    labels = torch.tensor([0, 1, 2, 0])
    _, nfe = DDIM(30, clip_x0=False).sample(model, AdaptiveGuidance(2.0, gamma=0.99), torch.randn(4, 1, 8, 8),
                                            labels)
    assert torch.is_tensor(nfe) and nfe.shape == (4,)
    assert (nfe < 60).all() and (nfe >= 31).all()


@pytest.mark.parametrize("make", [lambda: CFGRescale(2.0, phi=1.5), lambda: CFGInterval(2.0, sigma_lo=2.0, sigma_hi=1.0),
                                  lambda: CFGInterval(2.0, interval="edm2_m"),
                                  lambda: APG(2.0, norm_threshold=-1), lambda: AdaptiveGuidance(2.0, gamma=2.0)])
def test_parameter_errors(make):
    with pytest.raises(UserError):
        make()
