import pytest
import torch
from diffusers.guiders import ClassifierFreeZeroStarGuidance

from diffguide.guidance.cfg_zero_star import CFGZeroStar
from diffguide.models import gmm
from diffguide.samplers.ddim import DDIM


def test_cfg_zero_star_by_hand(toy):
    x, labels, t = torch.tensor([[[[0.2, -0.4], [0.0, 0.6]]]]), torch.tensor([0]), 0
    guidance = CFGZeroStar(2.0, zero_init_steps=1)
    guidance.start(toy, labels)
    first = guidance(toy, x, t, labels)
    assert torch.equal(first.eps, torch.zeros_like(x)) and first.nfe == 0 and toy.calls == []
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
    ours.start(model, labels)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=zero_steps)
    gen = torch.Generator().manual_seed(0)
    for step, t in enumerate([900, 600, 300, 100]):
        x = torch.randn(3, 1, 8, 8, generator=gen)
        guider.set_state(step=step, num_inference_steps=4, timestep=torch.tensor(t))
        theirs = guider.forward(model(x, t, labels), model(x, t, model.null_labels(labels))).pred
        assert torch.allclose(ours(model, x, t, labels).eps, theirs, atol=1e-5), step


def test_zero_init_saves_evaluations_and_restarts_per_trajectory():
    model = gmm.image(num_classes=3)
    guidance, labels = CFGZeroStar(2.0, zero_init_steps=2), torch.tensor([0, 1])
    for _ in range(2):
        _, nfe = DDIM(10, clip_x0=False).sample(model, guidance, torch.randn(2, 1, 8, 8), labels)
        assert nfe == 2 * (10 - 2)
