"""An exact class-conditional Gaussian mixture: closed-form denoisers with no training, in every model family.

Class k has prior weight pi_k and data x0 ~ N(mu_k, s^2 I). At a level x = alpha x0 + noise eps (see
diffguide/models/schedules.py), x | k ~ N(alpha mu_k, v I) with v = alpha^2 s^2 + noise^2, so
    E[eps | x, k] = noise (x - alpha mu_k) / v,        E[x0 | x, k] = mu_k + alpha s^2 (x - alpha mu_k) / v,
and the unconditional E[. | x] = sum_k p(k | x) E[. | x, k], with p(k | x) the exact posterior of the noisy data.
Label `num_classes` is the null class (the unconditional model).

`family` picks the noise process and its time: vp (DDPM's discrete linear schedule, integer timesteps), flow
(x = (1 - tau) x0 + tau eps, FlowMatchEulerDiscreteScheduler's time) or edm (x = x0 + sigma eps, EDMEulerScheduler's
grid); `parameterisation` what the "network" outputs (eps, v, x0, edm, flow; default: eps, flow, edm for the three
families). The exact prediction is converted to that output and back by the model's parameterisation adapter, so
the closed form checks every adapter, sampler and method under every family.
"""

import math
from typing import Sequence

import torch
from diffusers import DDPMScheduler

from diffguide.errors import UserError
from diffguide.models.denoiser import Denoiser
from diffguide.models.parameterisation import Prediction
from diffguide.models.schedules import EDMSchedule, FlowSchedule, Level

FAMILIES = {"vp": "eps", "flow": "flow", "edm": "edm"}


class GaussianMixture(Denoiser):
    def __init__(self, means: torch.Tensor, std: float, weights: Sequence[float] | None = None,
                 scheduler_config: dict | None = None, family: str = "vp", parameterisation: str | None = None):
        if family not in FAMILIES:
            raise UserError(f"model.family={family!r} is not one of {', '.join(FAMILIES)}")
        parameterisation = parameterisation or FAMILIES[family]
        means = torch.as_tensor(means, dtype=torch.float64)
        num_classes = means.shape[0]
        if family == "vp":
            scheduler = DDPMScheduler.from_config(scheduler_config or {"num_train_timesteps": 1000,
                                                                        "beta_schedule": "linear"})
            super().__init__(scheduler.alphas_cumprod, means.shape[1:], num_classes, null_class=num_classes,
                             scheduler_config=scheduler.config, parameterisation=parameterisation)
        else:
            schedule = (FlowSchedule(scheduler_config or {"num_train_timesteps": 1000, "shift": 1.0})
                        if family == "flow" else EDMSchedule(scheduler_config or {"sigma_min": 0.002,
                                                                                  "sigma_max": 80.0}))
            super().__init__(None, means.shape[1:], num_classes, null_class=num_classes,
                             scheduler_config=schedule.scheduler_config, schedule=schedule,
                             parameterisation=parameterisation)
        self.family = family
        # normalised in float64: the exact classifier's gradient is a reference to 1e-14, not float32's 1e-8
        weights = (torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64) if weights is None
                   else torch.as_tensor(weights, dtype=torch.float64))
        self.register_buffer("means", means, persistent=False)
        self.register_buffer("log_weights", (weights / weights.sum()).log(), persistent=False)
        self.std = float(std)

    def class_log_posterior(self, x: torch.Tensor, t) -> torch.Tensor:
        """log p(k | x_t) for every class, shape (batch, num_classes): the exact noise-aware classifier at level t."""
        level = self.level(t)
        column = torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)
        return self.log_posterior_at(x, column * level.alpha, column * level.noise)

    def log_posterior_at(self, x: torch.Tensor, alpha: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """log p(k | x) for x = alpha x0 + noise z, alpha and noise of shape (batch, 1); noise None: the VP level
        of alpha-bar `alpha` (alpha = sqrt(a), noise = sqrt(1 - a)); alpha = 1, noise = 0: the clean data."""
        if noise is None:
            alpha, noise = alpha.sqrt(), (1 - alpha).sqrt()
        v = alpha ** 2 * self.std ** 2 + noise ** 2
        diff = x.double().flatten(1)[:, None, :] - alpha[:, :, None] * self.means.flatten(1)[None]
        log_lik = -0.5 * diff.pow(2).sum(-1) / v
        return torch.log_softmax(log_lik + self.log_weights, dim=-1)

    def exact(self, x: torch.Tensor, level: Level, labels: torch.Tensor) -> Prediction:
        """E[x0 | x, y] and E[eps | x, y] in float64 (y = the null class: unconditional)."""
        alpha, noise = level.alpha, level.noise
        v = alpha ** 2 * self.std ** 2 + noise ** 2
        xd = x.double()
        residual = xd[:, None] - alpha * self.means[None]
        eps_per_class, x0_per_class = noise * residual / v, self.means[None] + alpha * self.std ** 2 * residual / v
        posterior = self.class_log_posterior(x, level).exp()
        weights = torch.where((labels == self.null_class)[:, None], posterior,
                              torch.nn.functional.one_hot(labels.clamp(max=self.num_classes - 1),
                                                          self.num_classes).double())
        mix = lambda per_class: torch.einsum("bk,bk...->b...", weights, per_class)  # noqa: E731
        return Prediction(mix(x0_per_class), mix(eps_per_class))

    def _output_at(self, x, level, labels):
        """The exact prediction as the parameterisation's network output (computed in float64, returned in x's
        dtype, as a network would be)."""
        exact = self.exact(x, level, labels)
        return self.parameterisation.output(exact, x.double(), level).to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact draws from the mixture, for checking samplers."""
        labels = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.sample_shape), generator=generator, dtype=torch.float64)
        return (self.means[labels] + self.std * noise).float(), labels


class DistilledMixture(GaussianMixture):
    """The mixture's ideal guidance-distilled student: at scale w its one prediction is exactly the teacher's CFG,
    out_u + w (out_c - out_u) on the network's output (the optimum of Meng et al.'s stage-1 loss), so that
    guidance=distilled on it gives CFG's images at half the network evaluations."""

    guidance_input = True
    trained_steps = None

    def predict_guided(self, x, t, labels, w) -> Prediction:
        level = self.level(t)
        out_u = self._output_at(x, level, self.null_labels(labels))
        out_c = self._output_at(x, level, labels)
        w = torch.as_tensor(w, dtype=out_u.dtype, device=out_u.device)
        w = w.view(-1, *([1] * (out_u.dim() - 1))) if w.dim() else w  # a scale per row, or one for all
        return self.parameterisation.prediction(out_u + w * (out_c - out_u), x, level)

    def check_sampling(self, sampler, guidance=None) -> None:
        from diffguide.models.student import refuse_other_guidance

        refuse_other_guidance(guidance)

    def check_scale(self, scale: float) -> None:
        """Every scale: the closed form has no training range."""


def ring(num_classes: int = 4, radius: float = 2.0, std: float = 0.3, weights=None, family: str = "vp",
         parameterisation: str | None = None) -> GaussianMixture:
    """2-D classes evenly spaced on a circle: the picture the guidance papers draw."""
    angles = torch.arange(num_classes, dtype=torch.float64) * 2 * math.pi / num_classes
    return GaussianMixture(torch.stack([radius * angles.cos(), radius * angles.sin()], 1), std, weights,
                           family=family, parameterisation=parameterisation)


def image(num_classes: int = 3, shape: Sequence[int] = (1, 8, 8), std: float = 0.2, seed: int = 0,
          family: str = "vp", parameterisation: str | None = None, distilled: bool = False) -> GaussianMixture:
    """Image-shaped classes with random means in [-0.7, 0.7]; `distilled`: its ideal guidance-distilled student."""
    g = torch.Generator().manual_seed(seed)
    return (DistilledMixture if distilled else GaussianMixture)((torch.rand((num_classes, *shape), generator=g, dtype=torch.float64) - 0.5) * 1.4, std,
                           family=family, parameterisation=parameterisation)
