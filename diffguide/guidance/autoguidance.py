"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself").

D = D_weak(x; c) + w (D_main(x; c) - D_weak(x; c)), both conditional, where the weak model is a smaller and/or
less trained version of the main one (EDM2: `gnet(x, t, y).lerp(net(x, t, y), w)` on the denoised x0). At the
same x_t and a_t, x0 is an affine function of eps, so the same lerp on eps gives the same x0. scale = w (1: the
main model alone). This is not diffusers' AutoGuidance guider, which skips layers of the main model.
"""

from diffguide.errors import UserError
from diffguide.guidance.base import Guidance, GuidedPrediction
from diffguide.guidance.combine import combine
from diffguide.guidance.weak_model import prepare_weak_model
from diffguide.models.denoiser import Denoiser


class AutoGuidance(Guidance):
    name = "autoguidance"

    def __init__(self, weak_model: Denoiser, scale: float):
        if not isinstance(weak_model, Denoiser):
            raise UserError("guidance=autoguidance needs a weak model: set guidance.weak_model")
        self.weak, self.scale = weak_model, self.check_scale(self.name, scale)

    def check(self, denoiser):
        prepare_weak_model(self.name, self.weak, denoiser)

    def __call__(self, denoiser, x, t, labels):
        main, weak = denoiser.predict(x, t, labels), self.weak.predict(x, t, labels)
        return GuidedPrediction.of(combine(denoiser, x, t, weak, main, self.scale), nfe=2)
