"""Skip-Layer Guidance (Stability AI's SD3.5, Stability-AI/sd3.5 PR #11; the layer skip of STG, Hyung et al. 2024,
"Spatiotemporal Skip Guidance", arXiv 2411.18664).

    D = D_c + s (D_c - D_skip)                    without CFG
    D = D_u + w (D_c - D_u) + s (D_c - D_skip)    with CFG (cfg_scale = w): SD3.5's form, CFG plus the skip term

D_skip is the conditional prediction of the same network with the chosen blocks skipped (each returns its input:
diffguide/models/hooks.py, kind skip_block), an implicit weak model. scale = s (0: no SLG). On the network's own
output, so the same rule for eps, v and flow models (SD3.5 is a flow model: it combines velocities). NFE per step
inside the window: 2 without CFG, 3 with; outside it 1 (2 with CFG).

The window: SD3.5 applies the skip term only on steps between skip_layer_guidance_start and _stop, fractions of the
trajectory (diffusers' StableDiffusion3Pipeline: `i > num_inference_steps * skip_layer_guidance_start and i <
num_inference_steps * skip_layer_guidance_stop`); `start` / `stop` here, with the rule of diffusers'
SkipLayerGuidance (`_is_slg_enabled`: int(start N) < i < int(stop N); start = 0 includes step 0, see
perturbation.PerturbationGuidance). It is a key of its own, not the weight schedule's: SD3.5 defines it on step counts,
not noise levels, and outside it the skip forward is not run at all (a schedule shapes s where it is run).

diffusers' SkipLayerGuidance (guiders/skip_layer_guidance.py, `forward`) gives the same D with
    with CFG:     guidance_scale = w, skip_layer_guidance_scale = s, use_original_formulation=False;
    without CFG:  use_original_formulation=True and guidance_scale=0, skip_layer_guidance_scale = s (its default
                  formulation with CFG off returns pred_cond_skip + s' (pred_cond - pred_cond_skip): s' = s + 1);
    skip_layer_guidance_start / stop = start / stop.

Defaults (conf/guidance/slg.yaml): s = 2.8, start = 0.01, stop = 0.2 (Stability AI's recommendation for SD3.5 Medium,
the defaults of diffusers' SkipLayerGuidance and StableDiffusion3Pipeline); blocks = the model's middle block
(perturbation.default_blocks; SD3.5 Medium skips its blocks 7, 8, 9 of 24); no CFG term by default, so that SLG is
compared on its own (SD3.5 always adds it to CFG: set guidance.cfg_scale).
"""

from diffguide.guidance.perturbation import PerturbationGuidance


class SLG(PerturbationGuidance):
    name = "slg"
    kind = "skip_block"
    what = "some of its blocks skipped"

    def __init__(self, scale: float, blocks=None, cfg_scale: float | None = None, start: float = 0.01,
                 stop: float = 0.2, schedule=None):
        super().__init__(scale, blocks, cfg_scale, start, stop, schedule)
