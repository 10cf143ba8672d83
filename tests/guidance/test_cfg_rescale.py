"""CFG-rescale (diffguide/guidance/cfg_rescale.py): against its formula, and against diffusers where it has one."""

import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance
from diffguide.errors import UserError
from diffguide.guidance.cfg_rescale import CFGRescale
from diffguide.models import gmm


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
    theirs = guider.forward(model.predict(x, 600, labels).eps, model.predict(x, 600, model.null_labels(labels)).eps).pred
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: CFGRescale(2.0, phi=1.5)])
def test_parameter_errors(make):
    with pytest.raises(UserError):
        make()
