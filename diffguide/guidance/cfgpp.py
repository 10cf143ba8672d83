"""CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models").

The data estimate comes from eps_lam = eps_u + lam (eps_c - eps_u), but the sampler re-noises it with the
UNconditional eps_u; for DDIM: x_{t-1} = sqrt(a_{t-1}) x0(eps_lam) + sqrt(1 - a_{t-1}) eps_u. The paper's
lam lies in [0, 1] (0.6 in its examples; lam = 1 is not CFG at w = 1 because of the re-noising).
Read as CFG, one CFG++ DDIM step from sigma_t to sigma_next (sigma = sqrt((1 - a) / a)) is a CFG step at
w_t = lam sigma_t / (sigma_t - sigma_next): a schedule that rises and falls over the trajectory and ends at lam;
scripts/cfgpp_effective_scale.py prints it, and the lam whose median w_t matches a CFG weight.

schedule (diffguide/guidance/weights.py): the rule acts on lambda with neutral_scale = 0, lam_t = lam f(p) (lam = 0,
the unconditional model, where f = 0); its mean lambda over the trajectory is lam. Every step spends 2 evaluations
(the re-noising needs eps_u, and the guided x0 eps_c, whatever lam_t is).
"""

import warnings

from diffguide.guidance.base import CFGLike, GuidedPrediction
from diffguide.guidance.combine import combine


class CFGPlusPlus(CFGLike):
    name = "cfgpp"
    #: lambda >= 0 (0: the unconditional model)
    min_scale = 0.0
    #: lambda = 0 is the unconditional model, no guidance: a schedule scales lambda itself
    neutral_scale = 0.0

    def __init__(self, scale: float, schedule=None):
        super().__init__(scale, schedule)
        if self.scale > 1.0:
            warnings.warn(f"cfgpp scale (lambda) {self.scale} is outside the paper's range [0, 1]; "
                          f"it extrapolates beyond the conditional manifold step", stacklevel=2)

    #: the samplers CFG++ has a form for (its official code and ComfyUI: DDIM, Euler, Euler-a, DPM++ 2S-a, DPM++ 2M;
    #: DDPM is DDIM at eta = 1 with the same re-noising); Heun and the SDE solver have none
    samplers = ("ddim", "ddpm", "dpmpp_2m", "dpmpp_2s_a", "euler", "euler_a")

    def __call__(self, denoiser, x, t, labels):
        uncond, cond = denoiser.pair(x, t, labels)
        lam = self.weight(denoiser, t)
        x0 = combine(denoiser, x, t, uncond, cond, lam).x0
        return GuidedPrediction(x0=x0, eps=uncond.eps, nfe=2, consistent=False)
