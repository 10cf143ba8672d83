"""CFG in a limited interval (diffguide/guidance/cfg_interval.py): against its formula, and against diffusers where it
has one."""

import pytest
import torch
from diffguide.errors import UserError
from diffguide.guidance.cfg import CFG
from diffguide.guidance.cfg_interval import CFGInterval
from diffguide.samplers.ddim import DDIM


def test_cfg_interval_guides_only_inside_and_saves_evaluations(toy):
    guidance = CFGInterval(3.0, sigma_lo=0.5, sigma_hi=2.0)
    x, labels = torch.randn(2, 1, 2, 2), torch.tensor([0, 1])
    for t in range(0, 1000, 37):
        sigma = toy.sigma(t)
        pred = guidance(toy, x, t, labels)
        inside = 0.5 < sigma <= 2.0
        expected = CFG(3.0)(toy, x, t, labels).eps if inside else toy.predict(x, t, labels).eps
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


@pytest.mark.parametrize("make", [lambda: CFGInterval(2.0, sigma_lo=2.0, sigma_hi=1.0), lambda: CFGInterval(2.0, interval="edm2_m")])
def test_parameter_errors(make):
    with pytest.raises(UserError):
        make()
