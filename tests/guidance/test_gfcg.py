import math

import pytest
import torch

from diffguide.errors import UserError
from diffguide.guidance.gfcg import GradientFreeClassifierGuidance
from tests.helpers import LinearClassifier, ToyDenoiser

X = torch.tensor([[[[0.2, -0.3], [0.4, 0.1]]], [[[-0.5, 0.6], [0.0, 0.3]]]])
LABELS = torch.tensor([0, 2])


class WeakToy(ToyDenoiser):
    """eps = 0.4 x + 0.05 (y + 1) + t / 1000: another network on the same schedule."""

    def _output(self, x, t, labels):
        return super()._output(x, t, labels) - 0.1 * x - 0.05 * (labels.to(x.dtype).view(-1, 1, 1, 1) + 1)


def by_hand(toy, W, t, labels):
    """The reference class and the ratio p_ref / (p_y + p_ref), worked out from the conditional x0."""
    a = float(toy.alphas_cumprod[t])
    refs, ratios = [], []
    for x, y in zip(X, labels.tolist()):
        eps_c = 0.5 * x + 0.1 * (y + 1) + t / 1000
        x0 = (x - math.sqrt(1 - a) * eps_c) / math.sqrt(a)
        p = torch.softmax(x0.flatten() @ W.T, 0)
        ref = max((k for k in range(3) if k != y), key=lambda k: float(p[k]))
        refs.append(ref)
        ratios.append(float(p[ref] / (p[y] + p[ref])))
    return refs, ratios


@pytest.mark.parametrize("base,w,nfe", [("none", 1.0, 2), ("cfg", 2.5, 3), ("autoguidance", 2.0, 3)])
def test_guided_noise_by_hand(toy, linear, base, w, nfe):
    t, s = 500, 3.0
    weak = WeakToy() if base == "autoguidance" else None
    g = GradientFreeClassifierGuidance(linear, scale=s, base=base, base_scale=w, weak_model=weak)
    g.check(toy)
    pred = g(toy, X, t, LABELS)
    refs, ratios = by_hand(toy, linear.weight, t, LABELS)
    for i, (y, ref, ratio) in enumerate(zip(LABELS.tolist(), refs, ratios)):
        x = X[i]
        eps_c = 0.5 * x + 0.1 * (y + 1) + t / 1000
        eps_base = {"none": eps_c,
                    "cfg": (0.5 * x + t / 1000) + w * (eps_c - (0.5 * x + t / 1000)),
                    "autoguidance": (0.4 * x + 0.05 * (y + 1) + t / 1000)
                    + w * (eps_c - (0.4 * x + 0.05 * (y + 1) + t / 1000))}[base]
        expected = eps_base + s * ratio * 0.1 * (y - ref)  # eps(y) - eps(ref) = 0.1 (y - ref) for the toy
        assert ref != y
        assert torch.allclose(pred.eps[i], expected, atol=1e-5)
    assert pred.nfe == nfe


def test_a_confident_classifier_leaves_the_base(toy):
    """When p_y is ~1 the adaptive scale vanishes: GFCG returns the base prediction (here the conditional one)."""
    sure = LinearClassifier(torch.zeros(3, 4))
    sure.weight[0] += 100.0 / 4 * torch.sign(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    g = GradientFreeClassifierGuidance(sure, scale=5.0, base="none")
    x = torch.full((1, 1, 2, 2), 0.5)
    g.check(toy)
    pred = g(toy, x, 10, torch.tensor([0]))
    assert torch.allclose(pred.eps, toy.predict(x, 10, torch.tensor([0])).eps, atol=1e-6)


def test_parameter_errors(linear, toy):
    with pytest.raises(UserError, match="classifier=NAME"):
        GradientFreeClassifierGuidance(None)
    with pytest.raises(UserError, match="base"):
        GradientFreeClassifierGuidance(linear, base="apg")
    with pytest.raises(UserError, match="weak model"):
        GradientFreeClassifierGuidance(linear, base="autoguidance")
    with pytest.raises(UserError, match="classes"):
        GradientFreeClassifierGuidance(LinearClassifier(torch.zeros(5, 4))).check(toy)
