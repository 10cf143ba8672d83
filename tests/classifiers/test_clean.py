import torch
from torch import nn

from diffguide.classifiers.clean import TimmClassifier


def test_softplus_surgery_replaces_every_relu(tiny_evaluator_path):
    plain = TimmClassifier(str(tiny_evaluator_path))
    smooth = TimmClassifier(str(tiny_evaluator_path), softplus_beta=3.0)
    assert any(isinstance(m, nn.ReLU) for m in plain.modules())
    assert not any(isinstance(m, nn.ReLU) for m in smooth.modules())
    assert any(isinstance(m, nn.Softplus) and m.beta == 3.0 for m in smooth.modules())
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    assert not torch.allclose(plain.logits(x0), smooth.logits(x0))
    # x0 in [-1, 1] is what the evaluator sees as [0, 1]
    assert torch.allclose(plain.logits(x0), plain.model(((x0 + 1) / 2)))


def test_the_mixture_clean_classifier_is_bayes_rule_on_clean_data():
    from diffguide.classifiers.gmm import ExactMixtureCleanClassifier
    from diffguide.models import gmm

    model = gmm.ring(num_classes=3, radius=2.0, std=0.5, weights=[0.2, 0.3, 0.5])
    x0 = torch.tensor([[0.3, -1.0], [1.5, 0.2]])
    log_lik = -((x0[:, None, :].double() - model.means[None]) ** 2).sum(-1) / (2 * 0.5 ** 2)
    expected = torch.log_softmax(log_lik + torch.tensor([0.2, 0.3, 0.5]).double().log(), dim=1)
    got = ExactMixtureCleanClassifier(model).logits(x0)
    assert torch.allclose(torch.log_softmax(got.double(), 1), expected, atol=1e-6)


def test_the_gradient_at_a_saturated_pixel_is_the_classifiers_own(tiny_evaluator_path):
    """EluCD (DDPM/scripts/classifier_sample.py, `design_cond_fn`) takes the classifier's gradient at the clipped
    pred_xstart: a pixel of x0 outside [-1, 1] gets the classifier's gradient at the clipped image, not the zero of
    a clamp in the gradient path."""
    torch.manual_seed(0)
    classifier = TimmClassifier(str(tiny_evaluator_path), softplus_beta=3.0)
    x0 = torch.rand(2, 1, 28, 28) * 3 - 1.5
    assert (x0.abs() > 1).float().mean() > 0.2
    x_in = x0.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(classifier.logits(x_in)[:, 3].sum(), x_in)
    clipped = x0.clamp(-1, 1).requires_grad_(True)
    (own,) = torch.autograd.grad(classifier.model((clipped + 1) / 2)[:, 3].sum(), clipped)
    assert torch.allclose(got, own, atol=1e-6)
    assert (got[x0.abs() > 1] != 0).float().mean() > 0.9
