import math

import pytest
import torch

from diffguide.guidance.cfgpp import CFGPlusPlus
from diffguide.samplers.ddim import DDIM
from diffguide.samplers.ddpm import DDPM
from diffguide.samplers.dpmpp_2m import DPMSolverPP2M


def test_cfgpp_prediction_by_hand(toy):
    x, labels, t, lam = torch.full((1, 1, 2, 2), -0.2), torch.tensor([1]), 200, 0.6
    pred = CFGPlusPlus(lam)(toy, x, t, labels)
    # eps_u = -0.1 + 0 + 0.2 = 0.1; eps_c = -0.1 + 0.2 + 0.2 = 0.3; eps_lam = 0.1 + 0.6 * 0.2 = 0.22
    a = float(toy.alphas_cumprod[t])
    assert torch.allclose(pred.x0, torch.full_like(x, (-0.2 - math.sqrt(1 - a) * 0.22) / math.sqrt(a)))
    assert torch.allclose(pred.eps, torch.full_like(x, 0.1)), "CFG++ re-noises with the unconditional eps"
    assert pred.nfe == 2 and not pred.consistent and toy.calls == [2]


def test_cfgpp_ddim_step_by_hand(toy):
    x, labels, t, t_next, lam = torch.full((1, 1, 2, 2), -0.2), torch.tensor([1]), 200, 100, 0.6
    sampler = DDIM(steps=10, clip_x0=False)
    x_next = sampler.update(toy, x, t, t_next, CFGPlusPlus(lam)(toy, x, t, labels), noise=None)
    a, a_next = float(toy.alphas_cumprod[t]), float(toy.alphas_cumprod[t_next])
    x0_lam = (-0.2 - math.sqrt(1 - a) * 0.22) / math.sqrt(a)
    expected = math.sqrt(a_next) * x0_lam + math.sqrt(1 - a_next) * 0.1
    assert torch.allclose(x_next, torch.full_like(x, expected), atol=1e-6)


def test_cfgpp_ddpm_step_by_hand(toy):
    x, labels, t, t_next = torch.full((1, 1, 2, 2), -0.2), torch.tensor([1]), 200, 100
    z = torch.tensor([0.3, -1.0, 2.0, 0.5]).view(1, 1, 2, 2)
    x_next = DDPM(steps=10, clip_x0=False).update(toy, x, t, t_next, CFGPlusPlus(0.6)(toy, x, t, labels),
                                                   noise=lambda: z)
    a, a_next = float(toy.alphas_cumprod[t]), float(toy.alphas_cumprod[t_next])
    s = math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
    x0_lam = (-0.2 - math.sqrt(1 - a) * 0.22) / math.sqrt(a)
    expected = math.sqrt(a_next) * x0_lam + math.sqrt(1 - a_next - s * s) * 0.1 + s * z
    assert torch.allclose(x_next, expected, atol=1e-6)


def test_cfgpp_dpmpp_2m_two_steps_by_hand(toy):
    """The CFG++ paper's 2M form: x0_lam + e^-h (x - x0_u) in sigma space, plus -expm1(-h)/(2r) (x0_lam - x0_u_prev)
    from the second step on; written here in the VP parametrisation."""
    guidance, labels = CFGPlusPlus(0.6), torch.tensor([2])
    sampler = DPMSolverPP2M(steps=10, clip_x0=False)
    sampler.reset()
    ts = [900, 600, 300]
    al = [float(toy.alphas_cumprod[t]) for t in ts]
    lam = [0.5 * math.log(a / (1 - a)) for a in al]

    x = torch.full((1, 1, 2, 2), 0.7)
    p1 = guidance(toy, x, ts[0], labels)
    x1 = sampler.update(toy, x, ts[0], ts[1], p1, noise=None)
    x0_u_1 = (x - math.sqrt(1 - al[0]) * p1.eps) / math.sqrt(al[0])
    expected1 = math.sqrt(al[1]) * p1.x0 + math.sqrt(1 - al[1]) / math.sqrt(1 - al[0]) * (x - math.sqrt(al[0]) * x0_u_1)
    assert torch.allclose(x1, expected1, atol=1e-6)

    p2 = guidance(toy, x1, ts[1], labels)
    x2 = sampler.update(toy, x1, ts[1], ts[2], p2, noise=None)
    h, h_prev = lam[2] - lam[1], lam[1] - lam[0]
    r = h_prev / h
    x0_u_2 = (x1 - math.sqrt(1 - al[1]) * p2.eps) / math.sqrt(al[1])
    first_order = math.sqrt(al[2]) * p2.x0 + math.sqrt(1 - al[2]) / math.sqrt(1 - al[1]) * (x1 - math.sqrt(al[1]) * x0_u_2)
    expected2 = first_order - math.sqrt(al[2]) * math.expm1(-h) / (2 * r) * (p2.x0 - x0_u_1)
    assert torch.allclose(x2, expected2, atol=1e-6)


def test_cfgpp_scale_above_one_warns():
    with pytest.warns(UserWarning, match="outside the paper's range"):
        CFGPlusPlus(1.5)


@pytest.mark.parametrize("lam, t, t_next", [(0.2, 900, 850), (0.35, 400, 300), (0.6, 120, 40)])
def test_a_cfgpp_ddim_step_is_a_cfg_step_at_the_effective_weight(toy, lam, t, t_next):
    """The identity diffguide/samplers/effective_scale.py computes (scripts/cfgpp_effective_scale.py prints it): with sigma = sqrt((1 - a) / a), the CFG++ DDIM step
    (CFGpp-diffusion/CFGpp latent_diffusion.py: x0 from eps_u + lam (eps_c - eps_u), re-noised with eps_u) equals a
    CFG DDIM step at w_t = lam sigma_t / (sigma_t - sigma_next), worked in EDM coordinates x / sqrt(a)."""
    from diffguide.guidance.cfg import CFG
    from diffguide.samplers.effective_scale import effective_weights

    x, labels = torch.tensor([[[[0.3, -1.1], [0.8, 0.05]]]]), torch.tensor([2])
    sampler = DDIM(steps=10, clip_x0=False)
    cfgpp_next = sampler.update(toy, x, t, t_next, CFGPlusPlus(lam)(toy, x, t, labels), noise=None)
    w = lam * toy.sigma(t) / (toy.sigma(t) - toy.sigma(t_next))
    cfg_next = sampler.update(toy, x, t, t_next, CFG(w)(toy, x, t, labels), noise=None)
    assert torch.allclose(cfgpp_next, cfg_next, atol=1e-5)
    weights = dict(effective_weights(toy, 10, lam, spacing="trailing"))
    steps = DDIM(10).timesteps(toy)
    t0, t1 = steps[3], steps[4]
    assert weights[t0] == pytest.approx(lam * toy.sigma(t0) / (toy.sigma(t0) - toy.sigma(t1)))
