"""Classifier-free guidance (Ho & Salimans 2022).

D = D_u + w (D_c - D_u) on the prediction (x0 and eps alike; on the network's own output, whatever it predicts): w = 1 is the conditional model, w = 0 the unconditional one (the convention of
diffusers' ClassifierFreeGuidance and of DiT; Ho & Salimans' own w is this w minus one).

channels = k guides the first k channels of eps only and takes the rest from the conditional prediction: DiT's
protocol for its reported FIDs (facebookresearch/DiT, models.py, `DiT.forward_with_cfg`: "For exact reproducibility
reasons, we apply classifier-free guidance on only three channels by default. The standard approach to cfg applies
it to all channels."; `eps, rest = model_out[:, :3], model_out[:, 3:]`), i.e. channels=3 on its 4 latent channels.
channels = None (the default) guides every channel.

schedule: w varies over the trajectory (diffguide/guidance/weights.py; conf/guidance/cfg.yaml lists the kinds): at
each step the weight w_t = self.weight(denoiser, t) replaces w, and a step whose w_t is exactly 1 (0) spends one
evaluation, the conditional (unconditional) prediction alone, so schedule=interval costs what cfg_interval costs.
"""

from diffguide.errors import UserError
from diffguide.guidance.base import CFGLike, GuidedPrediction
from diffguide.guidance.combine import combine


class CFG(CFGLike):
    name = "cfg"

    def __init__(self, scale: float, channels: int | None = None, schedule=None):
        super().__init__(scale, schedule)
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise UserError(f"guidance.channels must be a whole number >= 1, or null for all channels "
                            f"(got {channels!r})")
        self.channels = channels

    def check(self, denoiser):
        super().check(denoiser)
        if self.channels is not None and self.channels > denoiser.sample_shape[0]:
            raise UserError(f"guidance.channels={self.channels} exceeds the model's {denoiser.sample_shape[0]} "
                            f"channels: choose 1..{denoiser.sample_shape[0]}, or null for all of them")

    def __call__(self, denoiser, x, t, labels):
        partial = self.channels is not None and self.channels < x.shape[1]
        w = self.weight(denoiser, t)
        # At w = 1 and w = 0 the formula needs one of the two predictions only: spend one evaluation, not two
        # (at w = 0 only when every channel is guided: the others are the conditional prediction's).
        if w == 1.0:
            return GuidedPrediction.of(denoiser.predict(x, t, labels), nfe=1)
        if w == 0.0 and not partial:
            return GuidedPrediction.of(denoiser.predict(x, t, denoiser.null_labels(labels)), nfe=1)
        uncond, cond = denoiser.pair(x, t, labels)
        pred = combine(denoiser, x, t, uncond, cond, w)
        if partial:
            pred = pred.cat_channels(cond, self.channels)
        return GuidedPrediction.of(pred, nfe=2)
