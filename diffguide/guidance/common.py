"""What several guidance methods share, so that no method imports another: the CFG combination, and the checks and
placement of a second model (autoguidance's weak model, gfcg's autoguidance base)."""

import torch

from diffguide.errors import UserError
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


def prepare_weak_model(name: str, weak: Denoiser, denoiser: Denoiser) -> None:
    """The weak model must share the main model's noise process and classes; it runs on its device and precision."""
    if not isinstance(weak, Denoiser):
        raise UserError(f"guidance={name} needs a weak model: set guidance.weak_model")
    if not weak.same_noise_process(denoiser):
        raise UserError(f"guidance={name}: the weak model was trained on another noise schedule than the "
                        "main model, so their predictions cannot be mixed")
    if weak.num_classes != denoiser.num_classes:
        raise UserError(f"guidance={name}: the weak model knows {weak.num_classes} classes, "
                        f"the main model {denoiser.num_classes}")
    weak.to(denoiser.device).set_precision(denoiser.autocast_dtype)
