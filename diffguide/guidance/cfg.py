"""Classifier-free guidance (Ho & Salimans 2022).

eps = eps_u + w (eps_c - eps_u): w = 1 is the conditional model, w = 0 the unconditional one (the convention of
diffusers' ClassifierFreeGuidance and of DiT; Ho & Salimans' own w is this w minus one).

channels = k guides the first k channels of eps only and takes the rest from the conditional prediction: DiT's
protocol for its reported FIDs (facebookresearch/DiT, models.py, `DiT.forward_with_cfg`: "For exact reproducibility
reasons, we apply classifier-free guidance on only three channels by default. The standard approach to cfg applies
it to all channels."; `eps, rest = model_out[:, :3], model_out[:, 3:]`), i.e. channels=3 on its 4 latent channels.
channels = None (the default) guides every channel.
"""

import torch

from diffguide.errors import UserError
from diffguide.guidance.base import Guidance


def combine(eps_uncond, eps_cond, scale: float):
    return eps_uncond + scale * (eps_cond - eps_uncond)


class CFG(Guidance):
    name = "cfg"

    def __init__(self, scale: float, channels: int | None = None):
        self.scale = self.check_scale(self.name, scale)
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise UserError(f"guidance.channels must be a whole number >= 1, or null for all channels "
                            f"(got {channels!r})")
        self.channels = channels

    def start(self, denoiser, labels):
        self.require_null_class(self.name, denoiser)
        if self.channels is not None and self.channels > denoiser.sample_shape[0]:
            raise UserError(f"guidance.channels={self.channels} exceeds the model's {denoiser.sample_shape[0]} "
                            f"channels: choose 1..{denoiser.sample_shape[0]}, or null for all of them")

    def __call__(self, denoiser, x, t, labels):
        partial = self.channels is not None and self.channels < x.shape[1]
        # At w = 1 and w = 0 the formula needs one of the two predictions only: spend one evaluation, not two
        # (at w = 0 only when every channel is guided: the others are the conditional prediction's).
        if self.scale == 1.0:
            return self.from_eps(denoiser, x, t, denoiser(x, t, labels), nfe=1)
        if self.scale == 0.0 and not partial:
            return self.from_eps(denoiser, x, t, denoiser(x, t, denoiser.null_labels(labels)), nfe=1)
        eps_uncond, eps_cond = denoiser.eps_many(x, t, [denoiser.null_labels(labels), labels])
        eps = combine(eps_uncond, eps_cond, self.scale)
        if partial:
            eps = torch.cat([eps[:, :self.channels], eps_cond[:, self.channels:]], dim=1)
        return self.from_eps(denoiser, x, t, eps, nfe=2)
