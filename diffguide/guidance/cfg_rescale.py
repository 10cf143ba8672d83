"""CFG with guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed").

eps_cfg = eps_u + w (eps_c - eps_u); eps_r = eps_cfg std(eps_c) / std(eps_cfg), the std per sample over all
non-batch dimensions; eps = phi eps_r + (1 - phi) eps_cfg. Applied to the noise prediction, as diffusers'
`guidance_rescale` does; the paper uses phi = 0.7.
"""

import math

from diffguide.errors import UserError
from diffguide.guidance.base import Guidance
from diffguide.guidance.cfg import combine


def rescale(guided, conditional, phi: float):
    dims = list(range(1, guided.ndim))
    rescaled = guided * (conditional.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


class CFGRescale(Guidance):
    name = "cfg_rescale"

    def __init__(self, scale: float, phi: float = 0.7):
        self.scale = self.check_scale(self.name, scale)
        if not (isinstance(phi, (int, float)) and math.isfinite(phi) and 0.0 <= phi <= 1.0):
            raise UserError(f"guidance=cfg_rescale: phi must lie in [0, 1] (got {phi})")
        self.phi = float(phi)

    def start(self, denoiser, labels):
        self.require_null_class(self.name, denoiser)

    def __call__(self, denoiser, x, t, labels):
        eps_uncond, eps_cond = denoiser.eps_many(x, t, [denoiser.null_labels(labels), labels])
        eps = rescale(combine(eps_uncond, eps_cond, self.scale), eps_cond, self.phi)
        return self.from_eps(denoiser, x, t, eps, nfe=2)
