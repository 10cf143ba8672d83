"""CFG's combination on the network's own output, shared by every method that mixes a conditional and an
unconditional prediction (so that no method imports another)."""

import torch

from diffguide.guidance.base import GuidedPrediction
from diffguide.models.denoiser import Denoiser
from diffguide.models.parameterisation import Prediction


def combine(denoiser: Denoiser, x: torch.Tensor, t, uncond: Prediction, cond: Prediction, scale) -> Prediction:
    """uncond + scale (cond - uncond) (diffusers' convention: scale 1 is the conditional model), taken on the
    network's own output and converted back. Every parameterisation is affine in its output at a fixed x, so this is
    the same combination of x0 and of eps; on the network's output it is the same arithmetic, to the bit, as a CFG
    written on eps (on an eps model, x0 comes from the combined eps), so that an eps model's images do not depend
    on which form the code takes."""
    out_u, out_c = denoiser.output(uncond, x, t), denoiser.output(cond, x, t)
    return denoiser.from_output(out_u + scale * (out_c - out_u), x, t)


def cfg_like(denoiser: Denoiser, x: torch.Tensor, t, labels: torch.Tensor, w: float, rule) -> GuidedPrediction:
    """One step of a method that reshapes CFG's combination (TCFG, MAG): the conditional model alone at w = 1
    (1 NFE), else `rule(out_cond, out_uncond, w)` on the network's own outputs of one batched pair (2 NFE)."""
    if w == 1.0:
        return GuidedPrediction.of(denoiser.predict(x, t, labels), nfe=1)
    uncond, cond = denoiser.pair(x, t, labels)
    out = rule(denoiser.output(cond, x, t), denoiser.output(uncond, x, t), w)
    return GuidedPrediction.of(denoiser.from_output(out, x, t), nfe=2)
