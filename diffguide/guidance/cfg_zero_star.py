"""CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models").

Optimised scale: s* = <eps_c, eps_u> / ||eps_u||^2 per sample; eps = s* eps_u + w (eps_c - s* eps_u).
Zero-init: the first `zero_init_steps` steps spend no network evaluation and predict a zero flow-matching velocity,
as the paper's official code does on its flow models (`noise_pred = noise_pred * 0` for the first steps). A VP
state x_t = sqrt(a) x0 + sqrt(1 - a) eps is the flow state x_f = (1 - s) x0 + s eps scaled by sqrt(a) + sqrt(1 - a)
(s = sqrt(1 - a) / (sqrt(a) + sqrt(1 - a))), and the velocity is v = eps - x0; v = 0 with the state fixed gives
    x0 = eps = x_t / (sqrt(a_t) + sqrt(1 - a_t)),
so the step keeps x_t / (sqrt(a) + sqrt(1 - a)) where it is, exactly a flow-matching Euler step with v = 0. The
sampler takes it unclipped (clipping x0 would make the velocity nonzero again). eps = 0, the earlier reading, is the
zero velocity in EDM coordinates instead, which inflates a latent model's x (an audit measured std 1.000 -> 1.486
on DiT's first step).
The projection acts on eps, as diffusers' ClassifierFreeZeroStarGuidance does. scale = CFG's w.
"""

import torch

from diffguide.errors import UserError
from diffguide.guidance.base import Guidance, GuidedPrediction


def optimised_scale(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, tiny: float = 1e-8) -> torch.Tensor:
    cond, uncond = eps_cond.flatten(1).float(), eps_uncond.flatten(1).float()
    s = (cond * uncond).sum(1) / (uncond.pow(2).sum(1) + tiny)
    return s.view(-1, *[1] * (eps_cond.ndim - 1)).to(eps_cond.dtype)


class CFGZeroStar(Guidance):
    name = "cfg_zero_star"
    revision = 1  # 1: zero-init as a zero flow velocity

    def __init__(self, scale: float, zero_init_steps: int = 1):
        self.scale = self.check_scale(self.name, scale)
        if zero_init_steps < 0:
            raise UserError(f"guidance=cfg_zero_star: zero_init_steps must be >= 0 (got {zero_init_steps})")
        self.zero_init_steps = int(zero_init_steps)
        self._calls = 0

    def start(self, denoiser, labels):
        self.require_null_class(self.name, denoiser)
        self._calls = 0

    @staticmethod
    def zero_velocity(denoiser, x: torch.Tensor, t: int) -> GuidedPrediction:
        """The x0 and eps whose flow-matching velocity eps - x0 is zero at x_t (see the module docstring)."""
        a = denoiser.alpha(t)
        x0 = x / (a ** 0.5 + (1 - a) ** 0.5)
        return GuidedPrediction(x0, x0.clone(), nfe=0, clip=False)

    def __call__(self, denoiser, x, t, labels):
        self._calls += 1
        if self._calls <= self.zero_init_steps:
            return self.zero_velocity(denoiser, x, t)
        eps_uncond, eps_cond = denoiser.eps_many(x, t, [denoiser.null_labels(labels), labels])
        scaled_uncond = optimised_scale(eps_cond, eps_uncond) * eps_uncond
        eps = scaled_uncond + self.scale * (eps_cond - scaled_uncond)
        return self.from_eps(denoiser, x, t, eps, nfe=2)
