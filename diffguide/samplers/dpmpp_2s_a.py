"""DPM-Solver++(2S) ancestral (k-diffusion's sample_dpmpp_2s_ancestral), and its CFG++ form
(sample_dpmpp_2s_ancestral_cfg_pp in ComfyUI's comfy/k_diffusion/sampling.py). diffusers has no scheduler for it.

In EDM's coordinates x~ = x / alpha, with sigma_down, sigma_up Euler-ancestral's split of the step
(see euler.py) and lambda = -log(sigma):
    h = lambda(sigma_down) - lambda(sigma), sigma_s = exp(-(lambda(sigma) + h / 2))      (the midpoint)
    x~_2 = (sigma_s / sigma) x~' - expm1(-h / 2) x0,           x0_2 = the guidance's x0 at (x~_2, sigma_s)
    x~_next = (sigma_down / sigma) x~' - expm1(-h) x0_2 + sigma_up z
with x~' = x0 + sigma eps: x~ itself for a prediction whose eps is consistent with x0, and CFG++'s
`x + (denoised - temp[0])` (the guided x0 with the unconditional eps) for CFG++. Where sigma_down = 0 (the last step,
and a flow model's pure noise) the step is Euler's: x~_next = x0 + sigma_up z. Two evaluations of the guidance per
step, one where sigma_down = 0.
"""

import math

from diffusers import EulerAncestralDiscreteScheduler

from diffguide.samplers.euler import Euler, ancestral_split


class DPMSolverPP2SAncestral(Euler):
    name = "dpmpp_2s_a"
    scheduler_class = EulerAncestralDiscreteScheduler

    def step(self, denoiser, x, t, t_next, pred, noise, predict=None):
        sigma_down, sigma_up = ancestral_split(t, t_next)
        if sigma_down == 0:
            x_ve = pred.x0
        else:
            sigma = t.sigma
            h = math.log(sigma) - math.log(sigma_down)
            sigma_s = math.exp(-(-math.log(sigma) + h / 2))
            x_eff = pred.x0 + sigma * pred.eps
            x_2 = (sigma_s / sigma) * x_eff - math.expm1(-h / 2) * pred.x0
            midpoint = denoiser.schedule.at_sigma(sigma_s)
            second = predict(midpoint.alpha * x_2, midpoint)
            x_ve = (sigma_down / sigma) * x_eff - math.expm1(-h) * second.x0
        if not t_next.clean:
            x_ve = x_ve + sigma_up * noise()
        return t_next.alpha * x_ve
