"""The exact mixture as a reference: its weights and its classifier's gradient to float64 accuracy."""

import torch

from diffguide.models import gmm


def test_weights_are_normalised_in_float64():
    """p(k) = w_k / sum w: an independent float64 computation agrees to 1e-15 (a float32 normalisation is off by
    about 1e-8, which caps the exact classifier gradient's accuracy at 5e-8)."""
    weights = [0.2, 0.3, 0.5]
    model = gmm.ring(num_classes=3, weights=weights)
    expected = torch.tensor(weights, dtype=torch.float64)
    assert torch.allclose(model.log_weights.exp(), expected / expected.sum(), rtol=0, atol=1e-15)


def test_exact_classifier_gradient_matches_an_independent_float64_reference():
    """grad_x log p(k | x_t) of an isotropic mixture, worked by hand: with v = a s^2 + 1 - a and
    r_j = p(j | x_t), grad = -(x - sqrt(a) mu_k) / v + sum_j r_j (x - sqrt(a) mu_j) / v."""
    model = gmm.ring(num_classes=4, radius=2.0, std=0.3, weights=[0.1, 0.2, 0.3, 0.4])
    x = torch.tensor([[0.7, -0.4], [1.9, 0.3]], dtype=torch.float64)
    t, k = 450, torch.tensor([1, 3])
    a = model.alphas_cumprod[t]
    v = a * 0.3 ** 2 + 1 - a
    x_in = x.clone().requires_grad_(True)
    logp = model.log_posterior_at(x_in, a.view(1, 1).expand(2, 1))
    (grad,) = torch.autograd.grad(logp.gather(1, k.view(-1, 1)).sum(), x_in)
    means = model.means
    log_lik = -((x[:, None] - a.sqrt() * means[None]) ** 2).sum(-1) / (2 * v)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    r = torch.softmax(log_lik + w.log(), dim=1)
    diff = (x[:, None] - a.sqrt() * means[None]) / v
    expected = -diff[torch.arange(2), k] + (r[:, :, None] * diff).sum(1)
    assert torch.allclose(grad, expected, rtol=0, atol=1e-13)
