"""Adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High Guidance Scales
in Diffusion Models").

On the denoised predictions D_c, D_u (x0): diff = D_c - D_u; with momentum beta, m = diff + beta m_prev and
diff = m; clipped to norm r, diff *= min(1, r / ||diff||); split into the part parallel to D_c and the orthogonal
rest; update = orthogonal + eta parallel; D = D_c + (w - 1) update. Norms and projections are per sample over all
non-batch dimensions. scale = the paper's w (w = 1: the conditional model). No official code is public; the
defaults and their sources:
    eta = 0       the paper's recommendation (drop the parallel component);
    beta = -0.5   the paper's Table 10 setting for SDXL, as a public port quotes it (second-hand: the table itself
                  was not read here);
    r = 1.64      SDXL's r = 15 (same source) rescaled to the same per-element RMS on this project's default image:
                  r is an absolute L2 norm, so 15 * sqrt(784 / 65536) for 1x28x28 pixels against SDXL's 4x128x128
                  latents. Set norm_threshold for other image sizes.
(The values r = 2.5, beta = -0.75 used before could not be traced to any source.) diffusers'
AdaptiveProjectedGuidance gives the same D with guidance_scale = w - 1 and use_original_formulation=True (its
default form, D_u + w update, differs once the update is projected); its own defaults are r = 15, no momentum,
eta = 1.
schedule: w varies over the trajectory (diffguide/guidance/weights.py; neutral w = 1, where D = D_c): D = D_c +
(w_t - 1) update; the momentum buffer still takes every step's difference, and every step spends 2 evaluations.
"""

import torch

from diffguide.errors import UserError
from diffguide.guidance.base import CFGLike, GuidedPrediction
from diffguide.guidance.projection import momentum_average, projected_update


class APG(CFGLike):
    name = "apg"

    def __init__(self, scale: float, eta: float = 0.0, norm_threshold: float = 1.64, momentum: float = -0.5,
                 schedule=None):
        super().__init__(scale, schedule)
        if norm_threshold < 0:
            raise UserError(f"guidance=apg: norm_threshold must be >= 0 (got {norm_threshold}; 0 turns clipping off)")
        self.eta, self.norm_threshold, self.momentum = float(eta), float(norm_threshold), float(momentum)
        self._running = None

    def reset(self, denoiser, labels):
        self._running = None

    def update_direction(self, x0_cond: torch.Tensor, x0_uncond: torch.Tensor) -> torch.Tensor:
        diff = x0_cond - x0_uncond
        if self.momentum != 0.0:
            self._running = diff = momentum_average(diff, self._running, self.momentum)
        return projected_update(x0_cond, diff, self.eta, self.norm_threshold)

    def __call__(self, denoiser, x, t, labels):
        uncond, cond = denoiser.pair(x, t, labels)
        x0 = cond.x0 + (self.weight(denoiser, t) - 1) * self.update_direction(cond.x0, uncond.x0)
        return GuidedPrediction(x0, denoiser.eps_from_x0(x, t, x0), nfe=2)
