"""Smoothed Energy Guidance (Hong 2024, "Smoothed Energy Guidance: Guiding Diffusion Models with Reduced Energy
Curvature of Attention", arXiv 2408.00760).

    D = D_c + s (D_c - D_seg)

D_seg is the conditional prediction of the same network with the queries of the chosen self-attentions blurred by a
2-D Gaussian of width blur_sigma over the token grid, which blurs the attention weights (the energy landscape) the
same way (diffguide/models/hooks.py, kind attention_blur: SEG-SDXL's kernel, ceil(6 sigma) rounded up to odd,
reflect padding). blur_sigma = inf: every query is the mean query, a uniform attention map (the paper's limit of
maximal smoothing); as SEG-SDXL's README and diffusers' SmoothedEnergyGuidance (seg_blur_threshold_inf) do, a
blur_sigma above 9999 counts as infinite. A finite sigma needs a square token grid. scale = s (0: the conditional
model, no SEG). On the network's own output, so the same rule for eps, v and flow models.

With CFG (cfg_scale = w, cfg.yaml's convention): D = D_u + w (D_c - D_u) + s (D_c - D_seg). NFE per step: 2
without CFG, 3 with.

diffusers' SmoothedEnergyGuidance (guiders/smoothed_energy_guidance.py, `forward`) gives the same D with
    with CFG:     guidance_scale = w, seg_guidance_scale = s, use_original_formulation=False;
    without CFG:  use_original_formulation=True and guidance_scale=0, seg_guidance_scale = s (its default
                  formulation with CFG off returns pred_cond_seg + s' (pred_cond - pred_cond_seg): s' = s + 1);
seg_guidance_start / stop (defaults 0 / 1) are `start` / `stop` here. (Its own blur hook,
hooks/smoothed_energy_guidance_utils.py, has its finite and infinite branches swapped: diffguide/models/hooks.py.)

Defaults (conf/guidance/seg.yaml): s = 3.0 (SEG-SDXL's README: "We generally fix this parameter to 3.0"; diffusers'
guider defaults to 2.8); blur_sigma = inf (diffusers' seg_blur_sigma default 9999999, above its infinity
threshold; the README's example uses 100); blocks = the model's middle block (SEG-SDXL's seg_applied_layers=['mid'];
perturbation.default_blocks).
"""

import math

from diffguide.errors import UserError
from diffguide.guidance.perturbation import SEG_INFINITE_BLUR, PerturbationGuidance


class SEG(PerturbationGuidance):
    name = "seg"
    kind = "attention_blur"
    what = "its self-attention queries blurred"

    def __init__(self, scale: float, blocks=None, blur_sigma: float = math.inf, cfg_scale: float | None = None,
                 start: float = 0.0, stop: float = 1.0, schedule=None):
        super().__init__(scale, blocks, cfg_scale, start, stop, schedule)
        if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float)) or not blur_sigma > 0:
            raise UserError(f"guidance.blur_sigma must be > 0 (a Gaussian width in tokens; inf: uniform attention), "
                            f"got {blur_sigma!r}")
        self.blur_sigma = math.inf if blur_sigma > SEG_INFINITE_BLUR else float(blur_sigma)

    def perturbation(self, blocks):
        from diffguide.models.hooks import Perturbation

        return Perturbation(self.kind, blocks, blur_sigma=self.blur_sigma)
