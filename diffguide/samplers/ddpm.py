"""DDPM ancestral sampling (Ho et al. 2020), with the posterior variance beta-tilde ("fixed_small").

On any subsequence of timesteps the posterior q(x_next | x_t, x0) is DDIM's update at eta = 1, which is how it is
written here; with the full 1000 steps it is the DDPM paper's sampler exactly. A guidance score moves the mean by
(Sigma_t + boost) * score, as guided-diffusion's `p_sample` with `condition_mean` (and EluCD's `p_sample`) do.
"""

from diffusers import DDPMScheduler

from diffguide.samplers.ddim import DDIM


class DDPM(DDIM):
    name = "ddpm"
    scheduler_class = DDPMScheduler
    ancestral = True

    def __init__(self, steps: int, spacing: str = "trailing", clip_x0: bool = True):
        super().__init__(steps, eta=1.0, spacing=spacing, clip_x0=clip_x0)

    def update(self, denoiser, x, t, t_next, pred, noise):
        x_next = super().update(denoiser, x, t, t_next, pred, noise)
        if pred.score is not None:
            x_next = x_next + (self.posterior_variance(denoiser, t, t_next) + pred.score_boost) * pred.score
        return x_next
