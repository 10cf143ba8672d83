import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance

from diffguide.errors import UserError
from diffguide.guidance.cfg import CFG
from diffguide.guidance.none import NoGuidance
from diffguide.models import gmm
from tests.helpers import ToyDenoiser


def test_cfg_matches_formula_worked_by_hand(toy):
    x = torch.full((2, 1, 2, 2), 0.4)
    labels = torch.tensor([0, 2])
    t, w = 300, 3.0
    pred = CFG(w)(toy, x, t, labels)
    # eps_u = 0.5*0.4 + 0.1*0 + 0.3 = 0.5; eps_c = 0.2 + 0.1*(y+1) + 0.3 -> 0.6 (y=0), 0.8 (y=2)
    # eps = eps_u + w (eps_c - eps_u) = 0.5 + 3*0.1 = 0.8 and 0.5 + 3*0.3 = 1.4
    assert torch.allclose(pred.eps[0], torch.full((1, 2, 2), 0.8))
    assert torch.allclose(pred.eps[1], torch.full((1, 2, 2), 1.4))
    a = float(toy.alphas_cumprod[t])
    assert torch.allclose(pred.x0, (x - (1 - a) ** 0.5 * pred.eps) / a ** 0.5)
    assert pred.nfe == 2
    assert toy.calls == [4], "cond and uncond must go through one batched forward pass"


@pytest.mark.parametrize("w, expected_label", [(1.0, 1), (0.0, 3)])
def test_cfg_at_one_is_conditional_and_at_zero_unconditional_in_one_evaluation(toy, w, expected_label):
    x, labels = torch.randn(3, 1, 2, 2), torch.tensor([1, 1, 1])
    pred = CFG(w)(toy, x, 500, labels)
    assert torch.allclose(pred.eps, toy.predict(x, 500, torch.full_like(labels, expected_label)).eps)
    assert pred.nfe == 1 and toy.calls[0] == 3


@pytest.mark.parametrize("w", [0.5, 1.5, 4.0])
def test_cfg_equals_diffusers_guider(toy, w):
    x, labels = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    ours = CFG(w)(toy, x, 700, labels).eps
    guider = ClassifierFreeGuidance(guidance_scale=w)
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(700))
    theirs = guider.forward(toy.predict(x, 700, labels).eps, toy.predict(x, 700, toy.null_labels(labels)).eps).pred
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_cfg_on_the_exact_mixture():
    model = gmm.image(num_classes=3)
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    cond = NoGuidance()(model, x, 400, labels)
    uncond = NoGuidance(conditional=False)(model, x, 400, labels)
    assert torch.allclose(CFG(1.0)(model, x, 400, labels).eps, cond.eps)
    assert torch.allclose(CFG(0.0)(model, x, 400, labels).eps, uncond.eps)
    # The two-pass batched path at another scale is the same linear combination of the exact predictions.
    assert torch.allclose(CFG(2.5)(model, x, 400, labels).eps, uncond.eps + 2.5 * (cond.eps - uncond.eps), atol=1e-5)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), None])
def test_cfg_rejects_non_finite_scale(scale):
    with pytest.raises(UserError, match="finite scale"):
        CFG(scale)


def test_cfg_needs_a_null_class():
    model = ToyDenoiser()
    model.null_class = None
    with pytest.raises(UserError, match="null class"):
        CFG(2.0).check(model)


def test_cfg_on_three_of_four_channels_worked_by_hand():
    """DiT's protocol (facebookresearch/DiT models.py, DiT.forward_with_cfg: `eps, rest = model_out[:, :3],
    model_out[:, 3:]`, "we apply classifier-free guidance on only three channels by default"): channels 0-2 are
    eps_u + w (eps_c - eps_u), channel 3 is eps_c. Today's CFG has no `channels` and guides all four."""
    toy = ToyDenoiser(channels=4)
    x = torch.full((2, 4, 2, 2), 0.4)
    labels = torch.tensor([0, 2])
    pred = CFG(3.0, channels=3)(toy, x, 300, labels)
    # eps_u = 0.5*0.4 + 0 + 0.3 = 0.5; eps_c = 0.6 (y=0), 0.8 (y=2); guided: 0.5 + 3*0.1 = 0.8, 0.5 + 3*0.3 = 1.4
    assert torch.allclose(pred.eps[0, :3], torch.full((3, 2, 2), 0.8))
    assert torch.allclose(pred.eps[1, :3], torch.full((3, 2, 2), 1.4))
    assert torch.allclose(pred.eps[0, 3], torch.full((2, 2), 0.6))
    assert torch.allclose(pred.eps[1, 3], torch.full((2, 2), 0.8))
    a = float(toy.alphas_cumprod[300])
    assert torch.allclose(pred.x0, (x - (1 - a) ** 0.5 * pred.eps) / a ** 0.5)
    assert pred.nfe == 2 and toy.calls == [4]
    # every channel guided: the plain formula
    assert torch.allclose(CFG(3.0, channels=4)(toy, x, 300, labels).eps, CFG(3.0)(toy, x, 300, labels).eps)


def test_cfg_at_zero_on_some_channels_still_needs_the_conditional_prediction():
    toy = ToyDenoiser(channels=4)
    x, labels = torch.full((1, 4, 2, 2), 0.4), torch.tensor([2])
    pred = CFG(0.0, channels=3)(toy, x, 300, labels)
    assert torch.allclose(pred.eps[0, :3], torch.full((3, 2, 2), 0.5))  # eps_u
    assert torch.allclose(pred.eps[0, 3], torch.full((2, 2), 0.8))  # eps_c
    assert pred.nfe == 2


@pytest.mark.parametrize("channels, where", [(0, "init"), (-1, "init"), (2.5, "init"), (True, "init"), (5, "start")])
def test_cfg_channels_out_of_range_is_one_line(channels, where):
    with pytest.raises(UserError, match="guidance.channels") as err:
        CFG(1.5, channels=channels).check(ToyDenoiser(channels=4))
    assert "\n" not in str(err.value)
    if where == "start":
        assert "4 channels" in str(err.value)
