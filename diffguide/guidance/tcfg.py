"""Tangential damping CFG (Kwon et al. 2025, "TCFG: Tangential Damping Classifier-free Guidance", arXiv 2503.18137).

Per sample, the two predictions flattened to N-vectors form the 2 x N matrix A = [o_c; o_u]; its SVD
A = U S V^T gives the right singular vectors v_1 (the largest singular value) and v_2. The paper keeps the
"normal" direction v_1, shared by both scores, and drops the "tangential" one v_2 from the unconditional score:
    o_u' = (o_u . v_1) v_1,        o = o_u' + w (o_c - o_u'),
on the network's own output o (eps of an eps model, the velocity of a flow model; the paper's scores are eps up to a
factor -1/sigma per sample, which the projection does not see: it is linear in o_u and v_1 is unchanged by a
common scale of the two rows). w is CFG's scale in our convention (w = 1: the conditional model, whatever o_u' is;
Ho & Salimans' w is this w - 1). The sign of v_1 (which SVD leaves free) cancels in (o_u . v_1) v_1.

The same as diffusers' TangentialClassifierFreeGuidance (diffusers 0.42.1,
guiders/tangential_classifier_free_guidance.py, `normalized_guidance`, lines 132-151: SVD of
torch.stack([pred_cond, pred_uncond], dim=1).flatten(2), the second row of Vh zeroed, pred_uncond projected, then
pred_uncond + guidance_scale (pred_cond - pred_uncond), both pred_uncond the projected one) with
guidance_scale = w and its default use_original_formulation=False (True gives pred_cond + w (pred_cond - o_u'):
w shifted by one), and as ComfyUI's TCFG node (comfy_extras/nodes_tcfg.py, `score_tangential_damping`, on
x - denoised, i.e. sigma times eps or the velocity: the same direction per sample). That guider's `is_conditional`
property reads an attribute no class defines (`self._num_outputs_prepared`, line 104): reading it raises
AttributeError (SDXL's modular ControlNet denoise step reads it in guess mode); its `forward` and
`normalized_guidance` do not touch it, and they are what the tests compare with. The SVD runs in float64 here
(diffusers: float32).

At w = 1 the rule is the conditional prediction whatever o_u' is: that step spends one evaluation, as CFG's does.
schedule: w varies over the trajectory (diffguide/guidance/weights.py; neutral w = 1, one evaluation there).
"""

import torch

from diffguide.guidance.base import CFGLike
from diffguide.guidance.combine import cfg_like


def tangential_damping(out_cond: torch.Tensor, out_uncond: torch.Tensor) -> torch.Tensor:
    """o_u' = (o_u . v_1) v_1 per sample, v_1 the top right singular vector of the 2 x N matrix [o_c; o_u]."""
    batch = out_cond.shape[0]
    cond, uncond = out_cond.reshape(batch, -1).double(), out_uncond.reshape(batch, -1).double()
    _, _, vh = torch.linalg.svd(torch.stack([cond, uncond], dim=1), full_matrices=False)  # vh: (batch, 2, N)
    v1 = vh[:, 0]
    damped = (uncond * v1).sum(dim=1, keepdim=True) * v1
    return damped.reshape(out_uncond.shape).to(out_uncond.dtype)


def tcfg_output(out_cond: torch.Tensor, out_uncond: torch.Tensor, scale) -> torch.Tensor:
    """o_u' + w (o_c - o_u') on the network's outputs."""
    damped = tangential_damping(out_cond, out_uncond)
    return damped + scale * (out_cond - damped)


class TCFG(CFGLike):
    name = "tcfg"

    def __init__(self, scale: float, schedule=None):
        super().__init__(scale, schedule)

    def __call__(self, denoiser, x, t, labels):
        return cfg_like(denoiser, x, t, labels, self.weight(denoiser, t), lambda o_c, o_u, w: tcfg_output(o_c, o_u, w))
