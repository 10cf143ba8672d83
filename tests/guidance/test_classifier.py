import pytest
import torch

from diffguide.classifiers.gmm import ExactMixtureClassifier
from diffguide.errors import UserError
from diffguide.guidance.classifier import ClassifierGuidance
from diffguide.guidance.none import NoGuidance
from diffguide.models import gmm
from diffguide.samplers.ddim import DDIM


@pytest.fixture
def mixture():
    return gmm.image(num_classes=3, shape=(1, 4, 4), std=0.3)


@pytest.mark.parametrize("t", [50, 400, 900])
def test_exact_classifier_at_scale_one_is_the_exact_conditional_model(mixture, t):
    x, labels = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 2, 1, 0])
    guided = ClassifierGuidance(ExactMixtureClassifier(mixture), scale=1.0)(mixture, x, t, labels)
    assert torch.allclose(guided.eps, NoGuidance()(mixture, x, t, labels).eps, atol=1e-4)
    assert guided.nfe == 1


def test_scale_two_doubles_the_classifier_term_worked_by_hand(mixture):
    x, labels, t = torch.randn(2, 1, 4, 4), torch.tensor([0, 2]), 300
    a = float(mixture.alphas_cumprod[t])
    eps_u, eps_c = mixture(x, t, mixture.null_labels(labels)), mixture(x, t, labels)
    # grad log p(y | x_t) = (eps_u - eps_c) / sqrt(1 - a) by Bayes, so s = 2 gives eps_u + 2 (eps_c - eps_u).
    guided = ClassifierGuidance(ExactMixtureClassifier(mixture), scale=2.0)(mixture, x, t, labels)
    assert torch.allclose(guided.eps, eps_u + 2 * (eps_c - eps_u), atol=1e-4)
    assert a < 1


def test_the_graph_is_freed_every_step(mixture):
    guidance = ClassifierGuidance(ExactMixtureClassifier(mixture), scale=3.0)
    x, _ = DDIM(50, clip_x0=False).sample(mixture, guidance, torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]))
    assert x.grad_fn is None and not x.requires_grad
    pred = guidance(mixture, torch.randn(2, 1, 4, 4), 500, torch.tensor([0, 1]))
    assert pred.eps.grad_fn is None and pred.x0.grad_fn is None


def test_classifier_is_required():
    with pytest.raises(UserError, match="classifier=NAME"):
        ClassifierGuidance(None, scale=1.0)
