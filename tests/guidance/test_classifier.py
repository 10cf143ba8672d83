import pytest
import torch

from diffguide.classifiers.gmm import ExactMixtureClassifier
from diffguide.errors import UserError
from diffguide.guidance.classifier import ClassifierGuidance
from diffguide.guidance.none import NoGuidance
from diffguide.models import gmm
from diffguide.samplers.ddim import DDIM
from diffguide.samplers.ddpm import DDPM


def ddim_form(guidance, model, x, t, labels):
    """The prediction as the DDIM sampler uses it (guided-diffusion's condition_score), for a step t -> t - 1."""
    return DDIM(1, clip_x0=False)._finalize(model, x, t, t - 1, guidance(model, x, t, labels))


@pytest.fixture
def mixture():
    return gmm.image(num_classes=3, shape=(1, 4, 4), std=0.3)


@pytest.mark.parametrize("t", [50, 400, 900])
def test_exact_classifier_at_scale_one_is_the_exact_conditional_model(mixture, t):
    x, labels = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 2, 1, 0])
    guided = ddim_form(ClassifierGuidance(ExactMixtureClassifier(mixture), scale=1.0), mixture, x, t, labels)
    assert torch.allclose(guided.eps, NoGuidance()(mixture, x, t, labels).eps, atol=1e-4)
    assert guided.nfe == 1


def test_scale_two_doubles_the_classifier_term_worked_by_hand(mixture):
    x, labels, t = torch.randn(2, 1, 4, 4), torch.tensor([0, 2]), 300
    a = float(mixture.alphas_cumprod[t])
    eps_u, eps_c = mixture.predict(x, t, mixture.null_labels(labels)).eps, mixture.predict(x, t, labels).eps
    # grad log p(y | x_t) = (eps_u - eps_c) / sqrt(1 - a) by Bayes, so s = 2 gives eps_u + 2 (eps_c - eps_u).
    guided = ddim_form(ClassifierGuidance(ExactMixtureClassifier(mixture), scale=2.0), mixture, x, t, labels)
    assert torch.allclose(guided.eps, eps_u + 2 * (eps_c - eps_u), atol=1e-4)
    assert a < 1


def test_ancestral_step_is_condition_mean(mixture):
    """openai/guided-diffusion gaussian_diffusion.py, `condition_mean`: `new_mean = p_mean_var["mean"].float() +
    p_mean_var["variance"] * gradient.float()`, the mean from the clipped pred_xstart (clip_denoised), then
    `sample = out["mean"] + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise` (p_sample)."""
    mixture.data_range = (-1.0, 1.0)
    x, labels, t, t_next, s = torch.randn(2, 1, 4, 4) * 2, torch.tensor([0, 2]), 600, 300, 2.5
    z = torch.randn(2, 1, 4, 4)
    classifier = ExactMixtureClassifier(mixture)
    sampler = DDPM(2)
    pred = sampler._finalize(mixture, x, t, t_next, ClassifierGuidance(classifier, scale=s)(mixture, x, t, labels))
    got = sampler.update(mixture, x, t, t_next, pred, noise=lambda: z)
    a, a_next = float(mixture.alphas_cumprod[t]), float(mixture.alphas_cumprod[t_next])
    eps_u = mixture.predict(x, t, mixture.null_labels(labels)).eps
    x0 = ((x - (1 - a) ** 0.5 * eps_u) / a ** 0.5).clamp(-1, 1)
    beta = 1 - a / a_next
    mean = a_next ** 0.5 * beta / (1 - a) * x0 + (a / a_next) ** 0.5 * (1 - a_next) / (1 - a) * x
    variance = beta * (1 - a_next) / (1 - a)
    expected = mean + variance * s * classifier.grad_log_prob(x, t, labels) + variance ** 0.5 * z
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_graph_is_freed_every_step(mixture):
    guidance = ClassifierGuidance(ExactMixtureClassifier(mixture), scale=3.0)
    x, _ = DDIM(50, clip_x0=False).sample(mixture, guidance, torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]))
    assert x.grad_fn is None and not x.requires_grad
    pred = guidance(mixture, torch.randn(2, 1, 4, 4), 500, torch.tensor([0, 1]))
    assert pred.eps.grad_fn is None and pred.x0.grad_fn is None


def test_classifier_is_required():
    with pytest.raises(UserError, match="classifier=NAME"):
        ClassifierGuidance(None, scale=1.0)
