"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself").

D = D_weak(x; c) + w (D_main(x; c) - D_weak(x; c)), both conditional, where the weak model is a smaller and/or
less trained version of the main one (EDM2: `gnet(x, t, y).lerp(net(x, t, y), w)` on the denoised x0). At the
same x_t and a_t, x0 is an affine function of eps, so the same lerp on eps gives the same x0. scale = w (1: the
main model alone). This is not diffusers' AutoGuidance guider, which skips layers of the main model.
"""

import torch

from diffguide.errors import UserError
from diffguide.guidance.base import Guidance
from diffguide.guidance.cfg import combine
from diffguide.models.denoiser import Denoiser


def prepare_weak_model(name: str, weak: Denoiser, denoiser: Denoiser) -> None:
    """The weak model must share the main model's noise schedule and classes; it runs on its device and precision."""
    if not torch.allclose(weak.alphas_cumprod.cpu(), denoiser.alphas_cumprod.cpu()):
        raise UserError(f"guidance={name}: the weak model was trained on another noise schedule than the "
                        "main model, so their predictions cannot be mixed")
    if weak.num_classes != denoiser.num_classes:
        raise UserError(f"guidance={name}: the weak model knows {weak.num_classes} classes, "
                        f"the main model {denoiser.num_classes}")
    weak.to(denoiser.device).set_precision(denoiser.autocast_dtype)


class AutoGuidance(Guidance):
    name = "autoguidance"

    def __init__(self, weak_model: Denoiser, scale: float):
        if not isinstance(weak_model, Denoiser):
            raise UserError("guidance=autoguidance needs a weak model: set guidance.weak_model")
        self.weak, self.scale = weak_model, self.check_scale(self.name, scale)

    def start(self, denoiser, labels):
        prepare_weak_model(self.name, self.weak, denoiser)

    def __call__(self, denoiser, x, t, labels):
        eps_main, eps_weak = denoiser(x, t, labels), self.weak(x, t, labels)
        return self.from_eps(denoiser, x, t, combine(eps_weak, eps_main, self.scale), nfe=2)
