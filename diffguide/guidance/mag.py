"""Magnitude-aware guidance, MAMBO-G (Zhu et al. 2025, "MAMBO-G: Magnitude-Aware Mitigation for Boosted Guidance",
arXiv 2508.03442).

Per sample, the ratio of the guidance update to the unconditional prediction, r = ||o_c - o_u|| / ||o_u|| (L2 norms
over all non-batch dimensions), damps CFG's scale:
    w_r = 1 + (w - 1) exp(-alpha r),        o = o_u + w_r (o_c - o_u),
on the network's own output o (the paper's velocities v_cond, v_uncond on its flow models; eps on an eps model, as
diffusers' guider acts on whatever its noise_pred is). A large update relative to the prediction (the first steps,
where the paper sees CFG overshoot) guides less; alpha = 0 is CFG at w; w = 1 is the conditional model. Scales in
CFG's convention (the paper's w_max; Ho & Salimans' w is this w - 1).

The same as diffusers' MagnitudeAwareGuidance (diffusers 0.42.1, guiders/magnitude_aware_guidance.py, `mambo_guidance`,
lines 141-159: ratio = norm(diff) / norm(pred_uncond), 1 + (guidance_scale - 1) exp(-alpha ratio), pred_uncond +
that * diff) with guidance_scale = w, alpha = alpha and its default use_original_formulation=False (True:
pred_cond + w exp(-alpha r) diff, i.e. w shifted by one and damped whole). One case differs: where o_c = o_u (d = 0,
so any scale gives o_u) and o_u = 0, r is taken as 0 here, where diffusers' 0/0 gives NaN.

Defaults: alpha = 8, diffusers' default (the paper's authors merged that guider; their project page's example uses
guidance_scale = 10, alpha = 8 on text-to-image models). alpha multiplies a ratio whose size depends on what the
network outputs (eps, a velocity eps - x0, v), so a value tuned on one parameterisation does not carry over to
another unchanged.
schedule: w varies over the trajectory (diffguide/guidance/weights.py; neutral w = 1, one evaluation there); the
damping applies to the scheduled w_t: w_r = 1 + (w_t - 1) exp(-alpha r).
"""

import math

import torch

from diffguide.errors import UserError
from diffguide.guidance.base import CFGLike
from diffguide.guidance.combine import cfg_like


def magnitude_ratio(out_cond: torch.Tensor, out_uncond: torch.Tensor) -> torch.Tensor:
    """r = ||o_c - o_u|| / ||o_u|| per sample, shaped (batch, 1, ...) to broadcast; 0 where o_c = o_u."""
    dims = list(range(1, out_cond.ndim))
    diff_norm = (out_cond - out_uncond).norm(p=2, dim=dims, keepdim=True)
    uncond_norm = out_uncond.norm(p=2, dim=dims, keepdim=True)
    return torch.where(diff_norm > 0, diff_norm / uncond_norm, torch.zeros_like(diff_norm))


def mag_scale(out_cond: torch.Tensor, out_uncond: torch.Tensor, scale, alpha: float) -> torch.Tensor:
    """w_r = 1 + (w - 1) exp(-alpha r) per sample, shaped (batch, 1, ...)."""
    ratio = magnitude_ratio(out_cond, out_uncond)
    if alpha == 0:
        return torch.full_like(ratio, float(scale))
    return 1.0 + (scale - 1.0) * torch.exp(-alpha * ratio)


def mag_output(out_cond: torch.Tensor, out_uncond: torch.Tensor, scale, alpha: float) -> torch.Tensor:
    """o_u + w_r (o_c - o_u)."""
    return out_uncond + mag_scale(out_cond, out_uncond, scale, alpha) * (out_cond - out_uncond)


class MAG(CFGLike):
    name = "mag"

    def __init__(self, scale: float, alpha: float = 8.0, schedule=None):
        super().__init__(scale, schedule)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise UserError(f"guidance=mag: alpha must be a finite number >= 0 (0: plain CFG; got {alpha!r})")
        self.alpha = float(alpha)

    def __call__(self, denoiser, x, t, labels):
        return cfg_like(denoiser, x, t, labels, self.weight(denoiser, t),
                        lambda o_c, o_u, w: mag_output(o_c, o_u, w, self.alpha))
