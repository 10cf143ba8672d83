"""No guidance: the conditional model (or, with conditional=false, the unconditional one) alone."""

from diffguide.guidance.base import Guidance, GuidedPrediction


class NoGuidance(Guidance):
    name = "none"

    def __init__(self, conditional: bool = True):
        self.conditional = conditional

    def __call__(self, denoiser, x, t, labels):
        condition = denoiser.condition(labels, self.conditional)
        return GuidedPrediction.of(denoiser.predict(x, t, condition), nfe=1)
