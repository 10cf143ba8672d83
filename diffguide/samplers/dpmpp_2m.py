"""DPM-Solver++ 2M (Lu et al. 2022), the multistep second-order solver in the data (x0) prediction.

With alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma), h = lambda_next - lambda_t, r = h_prev / h:
    x_next = sigma_next eps + alpha_next x0 - alpha_next expm1(-h) / (2 r) (x0 - x0_base_prev)
where x0_base = (x - sigma eps) / alpha. For a prediction whose eps is consistent with x0 this is the usual
    x_next = (sigma_next / sigma) x - alpha_next expm1(-h) ((1 + 1/(2r)) x0 - 1/(2r) x0_prev);
for CFG++ (eps = eps_u) it is the CFG++ paper's 2M form, whose history term uses the previous unconditional x0.
The first step, and the last one (down to sigma = 0), are first order, as in diffusers.
"""

import math

from diffusers import DPMSolverMultistepScheduler

from diffguide.samplers.base import Sampler


class DPMSolverPP2M(Sampler):
    name = "dpmpp_2m"
    scheduler_class = DPMSolverMultistepScheduler
    history_keys = ("_prev_x0_base", "_prev_h")

    def __init__(self, steps: int, spacing: str = "linspace", clip_x0: bool = True):
        super().__init__(steps, spacing, clip_x0)
        self.reset()

    def reset(self):
        self._prev_x0_base = None
        self._prev_h = None

    @staticmethod
    def _lambda(a: float) -> float:
        return 0.5 * math.log(a / (1 - a))

    def update(self, denoiser, x, t, t_next, pred, noise):
        a_t, a_next = denoiser.alpha(t), denoiser.alpha(t_next)
        alpha_next, sigma_next = a_next ** 0.5, (1 - a_next) ** 0.5
        x_next = sigma_next * pred.eps + alpha_next * pred.x0
        last = t_next < 0
        if not last:
            h = self._lambda(a_next) - self._lambda(a_t)
            if self._prev_x0_base is not None:
                r = self._prev_h / h
                x_next = x_next - alpha_next * math.expm1(-h) / (2 * r) * (pred.x0 - self._prev_x0_base)
            self._prev_h = h
        self._prev_x0_base = (x - (1 - a_t) ** 0.5 * pred.eps) / a_t ** 0.5
        return x_next
