"""Adaptive guidance (diffguide/guidance/adaptive.py): against its formula, and against diffusers where it has one."""

import pytest
import torch
from diffguide.errors import UserError
from diffguide.guidance.adaptive import AdaptiveGuidance
from diffguide.guidance.cfg import CFG
from diffguide.models import gmm
from diffguide.samplers.ddim import DDIM


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
    assert torch.allclose(first.eps[0], toy.predict(x, 500, labels).eps[0])
    assert torch.allclose(first.eps[1], CFG(2.0)(toy, x, 500, labels).eps[1])
    second = guidance(toy, x, 400, labels)
    assert second.nfe.tolist() == [1.0, 2.0]
    assert torch.allclose(second.eps[0], toy.predict(x, 400, labels).eps[0])
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


@pytest.mark.parametrize("make", [lambda: AdaptiveGuidance(2.0, gamma=2.0)])
def test_parameter_errors(make):
    with pytest.raises(UserError):
        make()
