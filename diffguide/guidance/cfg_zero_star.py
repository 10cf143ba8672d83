"""CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models").

Optimised scale: s* = <o_c, o_u> / ||o_u||^2 per sample; o = s* o_u + w (o_c - s* o_u), on the network's own
output o (the paper's flow velocity on a flow model; eps on an eps model, as diffusers' ClassifierFreeZeroStarGuidance
acts on whatever its noise_pred is).
Zero-init: the first `zero_init_steps` steps spend no network evaluation and predict a zero flow-matching velocity,
as the paper's official code does on its flow models (`noise_pred = noise_pred * 0` for the first steps). A state
x = alpha x0 + noise eps at any level is the flow state x_f = (1 - s) x0 + s eps scaled by alpha + noise
(s = noise / (alpha + noise)), and the velocity is v = eps - x0; v = 0 with the state fixed gives
    x0 = eps = x / (alpha + noise)           (VP: x_t / (sqrt(a_t) + sqrt(1 - a_t)); a flow model: x itself),
so the step keeps x_t / (sqrt(a) + sqrt(1 - a)) where it is, exactly a flow-matching Euler step with v = 0. The
sampler takes it unclipped (clipping x0 would make the velocity nonzero again). eps = 0, the earlier reading, is the
zero velocity in EDM coordinates instead, which inflates a latent model's x (an audit measured std 1.000 -> 1.486
on DiT's first step).
The projection acts on eps, as diffusers' ClassifierFreeZeroStarGuidance does. scale = CFG's w.
schedule: w varies over the trajectory (diffguide/guidance/weights.py; neutral w = 1); the zero-init steps are
unaffected (they evaluate nothing).
"""

import torch

from diffguide.errors import UserError
from diffguide.guidance.base import CFGLike, GuidedPrediction


def optimised_scale(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, tiny: float = 1e-8) -> torch.Tensor:
    cond, uncond = eps_cond.flatten(1).float(), eps_uncond.flatten(1).float()
    s = (cond * uncond).sum(1) / (uncond.pow(2).sum(1) + tiny)
    return s.view(-1, *[1] * (eps_cond.ndim - 1)).to(eps_cond.dtype)


class CFGZeroStar(CFGLike):
    name = "cfg_zero_star"
    revision = 1  # 1: zero-init as a zero flow velocity

    def __init__(self, scale: float, zero_init_steps: int = 1, schedule=None):
        super().__init__(scale, schedule)
        if zero_init_steps < 0:
            raise UserError(f"guidance=cfg_zero_star: zero_init_steps must be >= 0 (got {zero_init_steps})")
        self.zero_init_steps = int(zero_init_steps)
        self._calls = 0

    def reset(self, denoiser, labels):
        self._calls = 0

    @staticmethod
    def zero_velocity(denoiser, x: torch.Tensor, t: int) -> GuidedPrediction:
        """The x0 and eps whose flow-matching velocity eps - x0 is zero at x_t (see the module docstring)."""
        level = denoiser.level(t)
        x0 = x / (level.alpha + level.noise)
        return GuidedPrediction(x0, x0.clone(), nfe=0, clip=False)

    def __call__(self, denoiser, x, t, labels):
        self._calls += 1
        if self._calls <= self.zero_init_steps:
            return self.zero_velocity(denoiser, x, t)
        uncond, cond = denoiser.pair(x, t, labels)
        out_u, out_c = denoiser.output(uncond, x, t), denoiser.output(cond, x, t)
        scaled_uncond = optimised_scale(out_c, out_u) * out_u
        out = scaled_uncond + self.weight(denoiser, t) * (out_c - scaled_uncond)
        return GuidedPrediction.of(denoiser.from_output(out, x, t), nfe=2)
