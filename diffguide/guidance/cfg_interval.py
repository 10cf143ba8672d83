"""CFG in a limited interval of noise levels (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval
Improves Sample and Distribution Quality in Diffusion Models").

CFG with weight w where sigma_lo < sigma_t <= sigma_hi, the conditional model alone (one evaluation) elsewhere;
sigma_t = sqrt((1 - a_t) / a_t), the EDM noise level of the VP timestep. The interval is a range of noise levels,
not of step indices, so it means the same thing at any step count. Defaults: the paper's FID-optimal EDM2-XXL
ImageNet-512 setting (w = 2.0 on steps 17-22 of 32 EDM steps, i.e. sigma from 1.61 down to 0.28).
"""

from diffguide.errors import UserError
from diffguide.guidance.base import Guidance
from diffguide.guidance.cfg import CFG
from diffguide.guidance.none import NoGuidance


class CFGInterval(Guidance):
    name = "cfg_interval"

    def __init__(self, scale: float, sigma_lo: float = 0.28, sigma_hi: float = 1.61):
        self.scale = self.check_scale(self.name, scale)
        if not 0.0 <= sigma_lo < sigma_hi:
            raise UserError(f"guidance=cfg_interval needs 0 <= sigma_lo < sigma_hi (got {sigma_lo}, {sigma_hi})")
        self.sigma_lo, self.sigma_hi = float(sigma_lo), float(sigma_hi)
        self._guided, self._conditional = CFG(self.scale), NoGuidance()

    def start(self, denoiser, labels):
        self.require_null_class(self.name, denoiser)

    def inside(self, denoiser, t: int) -> bool:
        return self.sigma_lo < denoiser.sigma(t) <= self.sigma_hi

    def __call__(self, denoiser, x, t, labels):
        method = self._guided if self.inside(denoiser, t) else self._conditional
        return method(denoiser, x, t, labels)
