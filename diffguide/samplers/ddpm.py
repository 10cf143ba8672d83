"""DDPM ancestral sampling (Ho et al. 2020), with the posterior variance beta-tilde ("fixed_small").

On any subsequence of timesteps the posterior q(x_next | x_t, x0) is DDIM's update at eta = 1, which is how it is
written here; with the full 1000 steps it is the DDPM paper's sampler exactly.
"""

from diffusers import DDPMScheduler

from diffguide.samplers.ddim import DDIM


class DDPM(DDIM):
    name = "ddpm"
    scheduler_class = DDPMScheduler

    def __init__(self, steps: int, spacing: str = "trailing", clip_x0: bool = True):
        super().__init__(steps, eta=1.0, spacing=spacing, clip_x0=clip_x0)
