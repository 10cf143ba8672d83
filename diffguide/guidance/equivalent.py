"""The equivalent CFG scale of any guidance method, step by step: Guidance Matters' protocol (arXiv 2602.22570,
Maxwells-Demons/Guidance-Matters: "the norm of the method's guided update over the norm of eps_c - eps_u", logged per
step, and its mean the scale of the compute-matched CFG baseline).

At every prediction the method makes, the probe also predicts eps_u and eps_c at the same x_t (one batched forward of
the pair, not counted in the run's network evaluations: the probe measures, it does not guide) and records, per
noise level, sum_i ||eps_g - eps_u||_i / sum_i ||eps_c - eps_u||_i over the samples (a ratio of sums, not a mean of
ratios: where a sample's two predictions nearly agree its own ratio is all rounding), with eps_g the eps consistent with the method's guided x0 at x_t
(for CFG at weight w exactly w; for CFG++ its lambda: its x0 is CFG's at lambda, its re-noising eps_u is not an
update). `summary()` gives the mean at each noise level visited and over the trajectory, as metrics.json's
`equivalent_scale`. `run ... equivalent_scale=true` turns it on.
"""

import torch

from diffguide.guidance.base import Guidance, GuidedPrediction


#: ||eps_c - eps_u|| below this fraction of ||eps_u||: the condition changes nothing there (float32 rounds at ~1e-7)
UNDEFINED = 1e-5


class EquivalentScaleProbe:
    """Wraps a Guidance: every call is the method's own, plus the measurement; every other attribute is the method's."""

    def __init__(self, guidance: Guidance):
        self.__dict__["inner"] = guidance
        self.__dict__["_sums"] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)

    def __call__(self, denoiser, x, t, labels) -> GuidedPrediction:
        pred = self.inner(denoiser, x, t, labels)
        level = denoiser.level(t)
        if level.noise > 0 and denoiser.null_class is not None:
            with torch.no_grad():
                uncond, cond = denoiser.pair(x, level, labels)
                at = pred.x if pred.x is not None else x
                guided = denoiser.eps_from_x0(at, level, pred.x0.detach())
                update = float((guided - uncond.eps).flatten(1).norm(dim=1).sum())
                delta = float((cond.eps - uncond.eps).flatten(1).norm(dim=1).sum())
                size = float(uncond.eps.flatten(1).norm(dim=1).sum())
            total, reference, scale = self._sums.get(level.sigma, (0.0, 0.0, 0.0))
            self._sums[level.sigma] = (total + update, reference + delta, scale + size)
        return pred

    def summary(self) -> dict:
        """{"per_step": [[sigma, mean ratio], ...] from the highest noise down, "mean": the mean over steps}."""
        steps = sorted(self._sums.items(), key=lambda kv: -kv[0])
        # a step where the condition no longer changes the prediction (eps_c = eps_u to float32's rounding) has no
        # equivalent scale: null there, and left out of the mean
        means = [total / reference if reference > UNDEFINED * size else None
                 for _, (total, reference, size) in steps]
        defined = [m for m in means if m is not None]
        return {"per_step": [["inf" if sigma == float("inf") else round(sigma, 6),
                              None if m is None else round(m, 6)] for (sigma, _), m in zip(steps, means)],
                "mean": round(sum(defined) / len(defined), 6) if defined else None}
