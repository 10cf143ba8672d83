"""DDIM (Song et al. 2021): x_next = alpha_next x0 + sqrt(noise_next^2 - s^2) eps + s z, with s^2 = eta^2 times the
posterior variance of the step (VP: s = eta sqrt((1 - a_next) / (1 - a_t)) sqrt(1 - a_t / a_next)); eta = 0 is
deterministic, and is Euler's method on the probability-flow ODE in EDM's (x / alpha, sigma) or a flow's (x, tau)
(x_next = alpha_next x0 + noise_next eps is both)."""

from diffusers import DDIMScheduler

from diffguide.errors import UserError
from diffguide.models.schedules import posterior_variance
from diffguide.samplers.base import Sampler


class DDIM(Sampler):
    name = "ddim"
    scheduler_class = DDIMScheduler

    def __init__(self, steps: int, eta: float = 0.0, spacing: str = "trailing", clip_x0: bool = True,
                 dynamic_threshold: float | None = None):
        super().__init__(steps, spacing, clip_x0, dynamic_threshold)
        if not 0.0 <= eta <= 1.0:
            raise UserError(f"ddim eta must lie in [0, 1] (got {eta})")
        self.eta = eta

    def step(self, denoiser, x, t, t_next, pred, noise, predict=None):
        s = self.eta * posterior_variance(t, t_next) ** 0.5
        x_next = self.mean(t_next, pred, s ** 2)
        return x_next + s * noise() if s > 0 else x_next

    @staticmethod
    def mean(t_next, pred, noise_variance: float):
        """alpha_next x0 + sqrt(noise_next^2 - s^2) eps: the mean of x_next given a noise variance s^2 (at s^2 the
        posterior variance, the posterior mean of q(x_next | x_t, x0) when eps is consistent with x0)."""
        return t_next.alpha * pred.x0 + max(t_next.noise ** 2 - noise_variance, 0.0) ** 0.5 * pred.eps
