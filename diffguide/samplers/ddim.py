"""DDIM (Song et al. 2021): x_next = sqrt(a_next) x0 + sqrt(1 - a_next - s^2) eps + s z, with
s = eta sqrt((1 - a_next) / (1 - a_t)) sqrt(1 - a_t / a_next); eta = 0 is deterministic."""

from diffusers import DDIMScheduler

from diffguide.errors import UserError
from diffguide.samplers.base import Sampler


class DDIM(Sampler):
    name = "ddim"
    scheduler_class = DDIMScheduler

    def __init__(self, steps: int, eta: float = 0.0, spacing: str = "trailing", clip_x0: bool = True):
        super().__init__(steps, spacing, clip_x0)
        if not 0.0 <= eta <= 1.0:
            raise UserError(f"ddim eta must lie in [0, 1] (got {eta})")
        self.eta = eta

    def update(self, denoiser, x, t, t_next, pred, noise):
        a_t, a_next = denoiser.alpha(t), denoiser.alpha(t_next)
        s = self.eta * ((1 - a_next) / (1 - a_t) * (1 - a_t / a_next)) ** 0.5
        x_next = a_next ** 0.5 * pred.x0 + max(1 - a_next - s ** 2, 0.0) ** 0.5 * pred.eps
        return x_next + s * noise() if s > 0 else x_next
