"""An exact class-conditional Gaussian mixture: closed-form denoisers with no training.

Class k has prior weight pi_k and data x0 ~ N(mu_k, s^2 I). Under x_t = sqrt(a) x0 + sqrt(1 - a) eps,
x_t | k ~ N(sqrt(a) mu_k, v I) with v = a s^2 + 1 - a, so
    E[eps | x_t, k] = sqrt(1 - a) (x_t - sqrt(a) mu_k) / v,
and the unconditional E[eps | x_t] = sum_k p(k | x_t) E[eps | x_t, k], with p(k | x_t) the exact posterior of the
noisy data. Label `num_classes` is the null class (the unconditional model).
"""

import math
from typing import Sequence

import torch
from diffusers import DDPMScheduler

from diffguide.models.denoiser import Denoiser


class GaussianMixture(Denoiser):
    def __init__(self, means: torch.Tensor, std: float, weights: Sequence[float] | None = None,
                 scheduler_config: dict | None = None):
        scheduler = DDPMScheduler.from_config(scheduler_config or {"num_train_timesteps": 1000,
                                                                    "beta_schedule": "linear"})
        means = torch.as_tensor(means, dtype=torch.float64)
        num_classes = means.shape[0]
        super().__init__(scheduler.alphas_cumprod, means.shape[1:], num_classes, null_class=num_classes,
                         scheduler_config=scheduler.config)
        # normalised in float64: the exact classifier's gradient is a reference to 1e-14, not float32's 1e-8
        weights = (torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64) if weights is None
                   else torch.as_tensor(weights, dtype=torch.float64))
        self.register_buffer("means", means, persistent=False)
        self.register_buffer("log_weights", (weights / weights.sum()).log(), persistent=False)
        self.std = float(std)

    def class_log_posterior(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p(k | x_t) for every class, shape (batch, num_classes): the exact noise-aware classifier."""
        return self.log_posterior_at(x, self.alphas_cumprod[t].view(-1, 1))

    def log_posterior_at(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """log p(k | x) for x = sqrt(a) x0 + sqrt(1 - a) noise, a of shape (batch, 1); a = 1: the clean data."""
        v = a * self.std ** 2 + 1 - a
        diff = x.double().flatten(1)[:, None, :] - a.sqrt()[:, :, None] * self.means.flatten(1)[None]
        log_lik = -0.5 * diff.pow(2).sum(-1) / v
        return torch.log_softmax(log_lik + self.log_weights, dim=-1)

    def _eps(self, x, t, labels):
        a = self.alphas_cumprod[t].view(-1, *[1] * len(self.sample_shape))
        v = a * self.std ** 2 + 1 - a
        xd = x.double()
        eps_per_class = (1 - a).sqrt()[:, None] * (xd[:, None] - a.sqrt()[:, None] * self.means[None]) / v[:, None]
        posterior = self.class_log_posterior(x, t).exp()
        weights = torch.where((labels == self.null_class)[:, None], posterior,
                              torch.nn.functional.one_hot(labels.clamp(max=self.num_classes - 1),
                                                          self.num_classes).double())
        return torch.einsum("bk,bk...->b...", weights, eps_per_class).to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact draws from the mixture, for checking samplers."""
        labels = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.sample_shape), generator=generator, dtype=torch.float64)
        return (self.means[labels] + self.std * noise).float(), labels


def ring(num_classes: int = 4, radius: float = 2.0, std: float = 0.3, weights=None) -> GaussianMixture:
    """2-D classes evenly spaced on a circle: the picture the guidance papers draw."""
    angles = torch.arange(num_classes, dtype=torch.float64) * 2 * math.pi / num_classes
    return GaussianMixture(torch.stack([radius * angles.cos(), radius * angles.sin()], 1), std, weights)


def image(num_classes: int = 3, shape: Sequence[int] = (1, 8, 8), std: float = 0.2, seed: int = 0) -> GaussianMixture:
    """Image-shaped classes with random means in [-0.7, 0.7]."""
    g = torch.Generator().manual_seed(seed)
    return GaussianMixture((torch.rand((num_classes, *shape), generator=g, dtype=torch.float64) - 0.5) * 1.4, std)
