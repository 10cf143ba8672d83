"""The sigma-space samplers of EDM (Karras et al. 2022) and k-diffusion, on every model family.

euler    Euler's method on the probability-flow ODE: x_next / alpha_next = x0 + sigma_next eps (diffusers'
         EulerDiscreteScheduler with s_churn = 0; FlowMatchEulerDiscreteScheduler on a flow model, whose step
         x + (tau_next - tau) v is the same point). CFG++'s Euler form (k-diffusion sample_euler_cfg_pp) re-noises
         with eps_u: the same line with eps = eps_u.
euler_a  Euler ancestral (k-diffusion sample_euler_ancestral, diffusers' EulerAncestralDiscreteScheduler):
         sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2), sigma_down = sqrt(sigma_next^2 - sigma_up^2),
         x_next / alpha_next = x0 + sigma_down eps + sigma_up z; CFG++'s form with eps = eps_u
         (sample_euler_ancestral_cfg_pp). At a flow model's tau = 1 (sigma = inf), sigma_down = 0, sigma_up = sigma_next.
heun     EDM's second-order method (Algorithm 1 without churn, the sampler of EDM2, autoguidance and the guidance
         interval papers; diffusers' HeunDiscreteScheduler): an Euler step to the next level, a second evaluation
         there, and the trapezoid of the two ODE velocities; Euler on the last step (to sigma = 0). The ODE is
         integrated in the family's own variables: EDM's (x / alpha, sigma) on VP and EDM models, (x, tau) on a flow
         model (diffusers' FlowMatchHeunDiscreteScheduler). Two network evaluations of the guidance per step.
"""

import math

from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from diffguide.samplers.base import Sampler


class Euler(Sampler):
    name = "euler"
    scheduler_class = EulerDiscreteScheduler

    def __init__(self, steps: int, spacing: str = "linspace", clip_x0: bool = True,
                 dynamic_threshold: float | None = None):
        super().__init__(steps, spacing, clip_x0, dynamic_threshold)

    def step(self, denoiser, x, t, t_next, pred, noise, predict=None):
        return t_next.alpha * pred.x0 + t_next.noise * pred.eps


def ancestral_split(t, t_next) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion's get_ancestral_step at eta = 1), written so that
    sigma = inf (a flow model's tau = 1) gives sigma_down = 0, sigma_up = sigma_next."""
    sigma_next = t_next.sigma
    shrink = 0.0 if math.isinf(t.sigma) else (sigma_next / t.sigma) ** 2
    return sigma_next * shrink ** 0.5, sigma_next * (1 - shrink) ** 0.5


class EulerAncestral(Euler):
    name = "euler_a"
    scheduler_class = EulerAncestralDiscreteScheduler

    def step(self, denoiser, x, t, t_next, pred, noise, predict=None):
        if t_next.clean:
            return pred.x0
        sigma_down, sigma_up = ancestral_split(t, t_next)
        return t_next.alpha * (pred.x0 + sigma_down * pred.eps + sigma_up * noise())


class Heun(Euler):
    name = "heun"
    scheduler_class = HeunDiscreteScheduler

    def step(self, denoiser, x, t, t_next, pred, noise, predict=None):
        x_euler = t_next.alpha * pred.x0 + t_next.noise * pred.eps
        if t_next.clean:
            return x_euler
        second = predict(x_euler, t_next)
        a1, b1 = denoiser.schedule.velocity_coefficients
        _, u = denoiser.schedule.coords(t)
        c_next, u_next = denoiser.schedule.coords(t_next)
        velocity_change = a1 * (second.x0 - pred.x0) + b1 * (second.eps - pred.eps)
        return x_euler + c_next * (u_next - u) / 2 * velocity_change
