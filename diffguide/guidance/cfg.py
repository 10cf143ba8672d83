"""Classifier-free guidance (Ho & Salimans 2022).

eps = eps_u + w (eps_c - eps_u): w = 1 is the conditional model, w = 0 the unconditional one (the convention of
diffusers' ClassifierFreeGuidance and of DiT; Ho & Salimans' own w is this w minus one).
"""

from diffguide.guidance.base import Guidance


def combine(eps_uncond, eps_cond, scale: float):
    return eps_uncond + scale * (eps_cond - eps_uncond)


class CFG(Guidance):
    name = "cfg"

    def __init__(self, scale: float):
        self.scale = self.check_scale(self.name, scale)

    def start(self, denoiser, labels):
        self.require_null_class(self.name, denoiser)

    def __call__(self, denoiser, x, t, labels):
        # At w = 1 and w = 0 the formula needs one of the two predictions only: spend one evaluation, not two.
        if self.scale == 1.0:
            return self.from_eps(denoiser, x, t, denoiser(x, t, labels), nfe=1)
        if self.scale == 0.0:
            return self.from_eps(denoiser, x, t, denoiser(x, t, denoiser.null_labels(labels)), nfe=1)
        eps_uncond, eps_cond = denoiser.eps_many(x, t, [denoiser.null_labels(labels), labels])
        return self.from_eps(denoiser, x, t, combine(eps_uncond, eps_cond, self.scale), nfe=2)
