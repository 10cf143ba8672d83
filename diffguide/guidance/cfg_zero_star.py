"""CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models").

Optimised scale: s* = <eps_c, eps_u> / ||eps_u||^2 per sample; eps = s* eps_u + w (eps_c - s* eps_u).
Zero-init: the first `zero_init_steps` steps predict eps = 0 and spend no network evaluation. The paper works on a
flow-matching velocity; on an eps model, eps = 0 is the zero velocity of the probability-flow ODE in EDM
coordinates (x_t / sqrt(a_t) stays where it is), and the projection acts on eps as diffusers'
ClassifierFreeZeroStarGuidance does. scale = CFG's w.
"""

import torch

from diffguide.errors import UserError
from diffguide.guidance.base import Guidance


def optimised_scale(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, tiny: float = 1e-8) -> torch.Tensor:
    cond, uncond = eps_cond.flatten(1).float(), eps_uncond.flatten(1).float()
    s = (cond * uncond).sum(1) / (uncond.pow(2).sum(1) + tiny)
    return s.view(-1, *[1] * (eps_cond.ndim - 1)).to(eps_cond.dtype)


class CFGZeroStar(Guidance):
    name = "cfg_zero_star"

    def __init__(self, scale: float, zero_init_steps: int = 1):
        self.scale = self.check_scale(self.name, scale)
        if zero_init_steps < 0:
            raise UserError(f"guidance=cfg_zero_star: zero_init_steps must be >= 0 (got {zero_init_steps})")
        self.zero_init_steps = int(zero_init_steps)
        self._calls = 0

    def start(self, denoiser, labels):
        self.require_null_class(self.name, denoiser)
        self._calls = 0

    def __call__(self, denoiser, x, t, labels):
        self._calls += 1
        if self._calls <= self.zero_init_steps:
            return self.from_eps(denoiser, x, t, torch.zeros_like(x), nfe=0)
        eps_uncond, eps_cond = denoiser.eps_many(x, t, [denoiser.null_labels(labels), labels])
        scaled_uncond = optimised_scale(eps_cond, eps_uncond) * eps_uncond
        eps = scaled_uncond + self.scale * (eps_cond - scaled_uncond)
        return self.from_eps(denoiser, x, t, eps, nfe=2)
