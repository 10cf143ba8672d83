"""CFG with guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed").

o_cfg = o_u + w (o_c - o_u); o_r = o_cfg std(o_c) / std(o_cfg), the std per sample over all non-batch
dimensions; o = phi o_r + (1 - phi) o_cfg, on the network's own output o, as diffusers' `guidance_rescale` does on
its noise_pred (eps for eps models; the paper's v for v-prediction; the velocity for flow models). The paper uses
phi = 0.7. schedule: w varies over the trajectory (diffguide/guidance/weights.py; neutral w = 1), phi stays.
"""

import math

from diffguide.errors import UserError
from diffguide.guidance.base import CFGLike, GuidedPrediction
from diffguide.guidance.combine import combine


def rescale(guided, conditional, phi: float):
    dims = list(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


class CFGRescale(CFGLike):
    name = "cfg_rescale"

    def __init__(self, scale: float, phi: float = 0.7, schedule=None):
        super().__init__(scale, schedule)
        if not (isinstance(phi, (int, float)) and math.isfinite(phi) and 0.0 <= phi <= 1.0):
            raise UserError(f"guidance=cfg_rescale: phi must lie in [0, 1] (got {phi})")
        self.phi = float(phi)

    def __call__(self, denoiser, x, t, labels):
        uncond, cond = denoiser.pair(x, t, labels)
        guided = combine(denoiser, x, t, uncond, cond, self.weight(denoiser, t))
        out = rescale(denoiser.output(guided, x, t), denoiser.output(cond, x, t), self.phi)
        return GuidedPrediction.of(denoiser.from_output(out, x, t), nfe=2)
