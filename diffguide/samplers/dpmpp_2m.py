"""DPM-Solver++ 2M (Lu et al. 2022), the multistep second-order solver in the data (x0) prediction, and its SDE
variant (diffusers' DPMSolverMultistepScheduler, algorithm_type "dpmsolver++" and "sde-dpmsolver++", midpoint).

With alpha, sigma the level's scale and noise (x = alpha x0 + sigma eps), lambda = log(alpha / sigma),
h = lambda_next - lambda_t, r = h_prev / h:
    2M:      x_next = sigma_next eps + alpha_next x0 - alpha_next expm1(-h) / (2 r) (x0 - x0_base_prev)
where x0_base = (x - sigma eps) / alpha. For a prediction whose eps is consistent with x0 this is the usual
    x_next = (sigma_next / sigma) x - alpha_next expm1(-h) ((1 + 1/(2r)) x0 - 1/(2r) x0_prev);
for CFG++ (eps = eps_u) it is the CFG++ paper's 2M form, whose history term uses the previous unconditional x0.
    2M SDE:  x_next = (sigma_next / sigma) e^-h x + alpha_next (1 - e^-2h) (x0 + (x0 - x0_prev) / (2 r))
                      + sigma_next sqrt(1 - e^-2h) z
The first step, and the last one (down to sigma = 0), are first order, as in diffusers. lambda is -inf at a flow
model's tau = 1 (alpha = 0), where the first-order step is x_next = alpha_next x0 + sigma_next eps (2M) exactly.
"""

import math

from diffusers import DPMSolverMultistepScheduler

from diffguide.samplers.base import Sampler


def _lambda(level) -> float:
    if level.alpha == 0:
        return -math.inf
    if level.noise == 0:
        return math.inf
    return math.log(level.alpha / level.noise)


class DPMSolverPP2M(Sampler):
    name = "dpmpp_2m"
    scheduler_class = DPMSolverMultistepScheduler
    history_keys = ("_prev_x0_base", "_prev_h")

    def __init__(self, steps: int, spacing: str = "linspace", clip_x0: bool = True,
                 dynamic_threshold: float | None = None):
        super().__init__(steps, spacing, clip_x0, dynamic_threshold)
        self.reset()

    def reset(self):
        self._prev_x0_base = None
        self._prev_h = None

    def _ratio(self, h: float) -> float | None:
        """r = h_prev / h of a second-order step, or None for a first-order one (the first and the last)."""
        if self._prev_x0_base is None or math.isinf(h):
            return None
        return self._prev_h / h

    def step(self, denoiser, x, t, t_next, pred, noise, predict=None):
        h = _lambda(t_next) - _lambda(t)
        x_next = t_next.noise * pred.eps + t_next.alpha * pred.x0
        r = self._ratio(h)
        if r is not None and not math.isinf(r):
            x_next = x_next - t_next.alpha * math.expm1(-h) / (2 * r) * (pred.x0 - self._prev_x0_base)
        self._prev_h = h
        self._prev_x0_base = pred.x0 if t.alpha == 0 else (x - t.noise * pred.eps) / t.alpha
        return x_next


class DPMSolverPP2MSDE(DPMSolverPP2M):
    name = "dpmpp_2m_sde"

    def step(self, denoiser, x, t, t_next, pred, noise, predict=None):
        h = _lambda(t_next) - _lambda(t)
        decay = math.exp(-h)  # 0 on the last step (h = inf) and from a flow's tau = 1
        x0 = pred.x0
        r = self._ratio(h)
        if r is not None and not math.isinf(r):
            x0 = x0 + (pred.x0 - self._prev_x0_base) / (2 * r)
        x_next = t_next.alpha * (1 - decay ** 2) * x0
        if decay > 0:
            x_next = x_next + (t_next.noise / t.noise * decay) * x
        if t_next.noise > 0:
            x_next = x_next + t_next.noise * (1 - decay ** 2) ** 0.5 * noise()
        self._prev_h = h
        self._prev_x0_base = pred.x0
        return x_next
