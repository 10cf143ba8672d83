"""Perturbed-Attention Guidance (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
Guidance", arXiv 2403.17377).

    D = D_c + s (D_c - D_pert)                                    (the paper's Eq. 10, on eps)

D_pert is the conditional prediction of the same network with the self-attention map of the chosen blocks replaced
by the identity (each token attends to itself only, so the attention's output is its value projection, then its
output projection: diffguide/models/hooks.py, kind attention_identity). scale = the paper's s: 0 is the conditional
model, no PAG. The official ADM code writes D_pert + g (D_c - D_pert), i.e. g = s + 1 (its run scripts' guide_scale
4.0 is s = 3; sunovivid/Perturbed-Attention-Guidance issue #9). Combined on the network's own output, so it is the
same rule for eps, v and flow models.

With CFG (cfg_scale = w, cfg.yaml's convention, 1: conditional): D = D_u + w (D_c - D_u) + s (D_c - D_pert), the
form of diffusers' PAG pipelines (pipelines/pag/pag_utils.py, `_apply_perturbed_attention_guidance`) and of its
PerturbedAttentionGuidance guider with CFG on. NFE per step: 2 without CFG, 3 with.

diffusers' PerturbedAttentionGuidance (guiders/perturbed_attention_guidance.py, `forward`) gives the same D with
    with CFG:     guidance_scale = w, perturbed_guidance_scale = s, use_original_formulation=False;
    without CFG:  use_original_formulation=True and guidance_scale=0 (its CFG off), perturbed_guidance_scale = s;
                  its default formulation with CFG off (guidance_scale=1) returns pred_cond_skip + s' (pred_cond -
                  pred_cond_skip), the official code's form: s' = s + 1.
Its perturbed_guidance_start / stop (defaults 0.01 / 0.2, SLG's) are `start` / `stop` here, defaulting to the
whole trajectory as the paper and diffusers' PAG pipelines apply PAG at every step (the window rule:
perturbation.PerturbationGuidance).

Defaults (conf/guidance/pag.yaml): s = 3.0 (diffusers' PAG pipelines' pag_scale; the paper's Stable Diffusion
setting; the official ADM scripts' g = 4.0); blocks = the model's middle block (perturbation.default_blocks: the UNet's
mid-block attention, as the paper and diffusers' StableDiffusionPAGPipeline ("mid") use on Stable Diffusion; a DiT's
block len // 2). The official ADM runs perturb four layers (input_blocks.14.1, 16.1, 17.1, middle_block.1).
"""

from diffguide.guidance.perturbation import PerturbationGuidance


class PAG(PerturbationGuidance):
    name = "pag"
    kind = "attention_identity"
    what = "its self-attention maps replaced by the identity"
