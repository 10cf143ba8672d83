"""The sampling loop shared by every sampler; each sampler file supplies its diffusers scheduler (whose grid of
noise levels it follows) and its update rule.

The loop walks the model's noise levels (diffguide/models/schedules.py: `Level`, x = alpha x0 + noise eps in the
model's own coordinates, sigma = noise / alpha), so one sampler works with every model family: a discrete VP model
keeps the exact timesteps of the scheduler, a flow model FlowMatchEulerDiscreteScheduler's grid, an EDM model Karras'.

The update rules are written here rather than taken from diffusers' `step` because a diffusers scheduler derives
both the data estimate and the re-noising direction from one model output, and guidance methods such as CFG++ need
the two to differ; diffusers still supplies the grids, and tests check each rule against its scheduler's step.

x0 is brought into the model's data range (pixel models) before each step, where `clip_x0` (every sampler's key)
asks: by the static clip to the range (guided-diffusion's clip_denoised), or, with `dynamic_threshold: p`, by Imagen's
dynamic thresholding (Saharia et al. 2022, Sec. 2.3), which then replaces the static clip (see `dynamic_threshold`).
"""

from typing import Callable, Sequence

import torch

from diffguide.errors import UserError
from diffguide.guidance.base import Guidance, GuidedPrediction
from diffguide.models.denoiser import Denoiser
from diffguide.models.schedules import CLEAN, Level, posterior_variance, transition

SPACINGS = ("leading", "trailing", "linspace")


def dynamic_threshold(x0: torch.Tensor, percentile: float, data_range: tuple[float, float]) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3 and its pseudocode): per sample, s = the
    `percentile` quantile of |x0| over all non-batch dimensions (linear interpolation, torch.quantile's default and
    diffusers'), s = max(s, 1), x0 = clamp(x0, -s, s) / s. Written for data in [-1, 1]; another range (lo, hi) is
    mapped onto it first (x0 - centre) / half-width and back after (exact, no arithmetic change, for (-1, 1)).
    Equals diffusers' `_threshold_sample` (DDPMScheduler, DDIMScheduler: thresholding=True,
    dynamic_thresholding_ratio = percentile) with a sample_max_value no smaller than the largest s: diffusers caps s
    at sample_max_value, and at its default 1.0 its rule is the static clip to [-1, 1] (its own comment,
    scheduling_ddpm.py:452). Computed in float32 at least (diffusers' upcast: quantile needs it), returned in x0's
    dtype."""
    lo, hi = data_range
    centre, half = (hi + lo) / 2, (hi - lo) / 2
    y = x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()
    y = (y - centre) / half
    s = torch.quantile(y.abs().flatten(1), percentile, dim=1).clamp(min=1.0)
    s = s.view(-1, *[1] * (y.ndim - 1))
    y = torch.clamp(y, -s, s) / s
    return (centre + half * y).to(x0.dtype)


class Sampler:
    name = "sampler"
    scheduler_class = None  # the diffusers scheduler whose grid this sampler follows on discrete VP models

    def __init__(self, steps: int, spacing: str = "trailing", clip_x0: bool = True,
                 dynamic_threshold: float | None = None):
        if not isinstance(steps, int) or steps < 1:
            raise UserError(f"steps must be a whole number >= 1 (got {steps!r})")
        if spacing not in SPACINGS:
            raise UserError(f"sampler spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
        if dynamic_threshold is not None:
            if isinstance(dynamic_threshold, bool) or not isinstance(dynamic_threshold, (int, float)) \
                    or not 0.0 < dynamic_threshold <= 1.0:
                raise UserError(f"sampler.dynamic_threshold must be a fraction in (0, 1] (0.995: the 99.5th "
                                f"percentile of |x0|), or null for the static clip (got {dynamic_threshold!r})")
            if not clip_x0:
                raise UserError(f"sampler.dynamic_threshold={dynamic_threshold} replaces the static clip of x0, "
                                f"which sampler.clip_x0=false turns off: set clip_x0=true, or dynamic_threshold=null")
            dynamic_threshold = float(dynamic_threshold)
        self.steps, self.spacing, self.clip_x0 = steps, spacing, clip_x0
        #: None: x0 is clipped to the data range (where clip_x0); a fraction p: Imagen's dynamic thresholding at the
        #: p-quantile of |x0| instead (see `dynamic_threshold`)
        self.dynamic_threshold = dynamic_threshold

    def check(self, denoiser: Denoiser, guidance: Guidance | None = None) -> None:
        """Refuse, in one line, a model (or a guidance method) this sampler cannot step with."""
        if denoiser.num_train_timesteps is not None and self.steps > denoiser.num_train_timesteps:
            raise UserError(f"steps={self.steps} exceeds the model's {denoiser.num_train_timesteps} training timesteps")
        if self.dynamic_threshold is not None and denoiser.data_range is None:
            raise UserError(f"sampler.dynamic_threshold needs a pixel model with a data range (Imagen's rule "
                            f"thresholds at the range's bound); this model's x0 is a latent with none: "
                            f"set sampler.dynamic_threshold=null")
        if guidance is not None and guidance.samplers is not None and self.name not in guidance.samplers:
            raise UserError(f"guidance={guidance.name} has no form for sampler={self.name}; it is defined on "
                            f"sampler={', '.join(guidance.samplers)}")
        if guidance is not None:
            guidance.check_sampler(self, denoiser)
        denoiser.check_sampling(self, guidance)

    def levels(self, denoiser: Denoiser) -> list[Level]:
        """The descending noise levels the sampler evaluates the model at (the clean level, where the trajectory
        ends, not included)."""
        self.check(denoiser)
        return denoiser.schedule.grid(self.scheduler_class, self.steps, self.spacing)

    def timesteps(self, denoiser: Denoiser) -> list:
        """The model's own times of `levels` (a discrete model's timesteps)."""
        return [level.t for level in self.levels(denoiser)]

    #: True for samplers that draw x_next from the Gaussian posterior q(x_next | x_t, x0) (DDPM): a guidance
    #: `score` moves their mean (guided-diffusion's condition_mean) instead of their eps.
    ancestral = False
    #: True for a sampler that steps with the model's learned variance (DDPM's variance=learned): `sample` then
    #: records the variance channels of the denoiser's forwards during each guidance call and sets the prediction's
    #: `log_variance` from `model_log_variance`.
    uses_model_variance = False
    #: network evaluations of the guidance per step (Heun: 2, except on its last step)
    evaluations_per_step = 1

    def model_log_variance(self, denoiser: Denoiser, guidance: Guidance, labels: torch.Tensor,
                           levels: list[Level], i: int) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def posterior_variance(denoiser: Denoiser, t, t_next) -> float:
        """Sigma_t: the variance of q(x_next | x_t, x0) for the step t -> t_next of this trajectory (levels or a
        discrete model's timesteps, -1 the clean data): beta_step (1 - a_next) / (1 - a_t) on a VP trajectory."""
        return posterior_variance(denoiser.level(t), denoiser.level(t_next))

    def _finalize(self, denoiser: Denoiser, x: torch.Tensor, t, t_next,
                  pred: GuidedPrediction) -> GuidedPrediction:
        """Clip x0 to the model's data range where asked (pixel models), or threshold it dynamically
        (`dynamic_threshold`), keeping eps consistent with it (for a prediction whose eps is: CFG++'s stays eps_u,
        and its thresholded x0 is re-noised with it, as with the static clip); then apply the guidance's score in the
        sampler's form (see GuidedPrediction.score) and add its x0_offset, neither of which the clipping or
        thresholding may cut."""
        t, t_next = denoiser.level(t), denoiser.level(t_next)
        x0, eps, score = pred.x0, pred.eps, pred.score
        if self.clip_x0 and pred.clip and denoiser.data_range is not None:
            if self.dynamic_threshold is None:
                x0 = x0.clamp(*denoiser.data_range)
            else:
                x0 = dynamic_threshold(x0, self.dynamic_threshold, denoiser.data_range)
            if pred.consistent:
                eps = (x - t.alpha * x0) / t.noise
        if score is not None and t.alpha == 0:
            # a flow model's pure noise (tau = 1): x says nothing of the class, and condition_score's move of x0,
            # noise^2 / alpha times the score, is unbounded; the step takes no classifier term
            score = None
        if score is not None and not self.ancestral:
            variance = posterior_variance(t, t_next)
            factor = (variance + pred.score_boost) / variance if variance > 0 else 1.0
            # condition_score: eps -= noise * factor * score, and x0 the one consistent with it
            eps = eps - t.noise * factor * score
            x0 = (x - t.noise * eps) / t.alpha
            score = None
        if pred.x0_offset is not None:
            x0 = x0 + pred.x0_offset
        return GuidedPrediction(x0, eps, pred.nfe, pred.consistent and pred.x0_offset is None, score=score,
                                score_boost=pred.score_boost)

    def update(self, denoiser: Denoiser, x: torch.Tensor, t, t_next, pred: GuidedPrediction,
               noise: Callable[[], torch.Tensor], predict: Callable[[torch.Tensor, Level], GuidedPrediction] | None = None
               ) -> torch.Tensor:
        """x at level t_next from x at level t (Levels, or a discrete model's timesteps) and the (finalized)
        prediction there; `predict(x, level)` runs the guidance again (finalized, its NFE counted) for samplers of
        several evaluations per step."""
        return self.step(denoiser, x, denoiser.level(t), denoiser.level(t_next), pred, noise, predict)

    def step(self, denoiser: Denoiser, x: torch.Tensor, t: Level, t_next: Level, pred: GuidedPrediction,
             noise: Callable[[], torch.Tensor], predict=None) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget multistep history before a new trajectory."""

    #: attributes holding a multistep sampler's history (saved and restored around a self-recurrence)
    history_keys: tuple[str, ...] = ()

    def history(self) -> dict:
        return {key: getattr(self, key) for key in self.history_keys}

    def restore(self, history: dict) -> None:
        for key, value in history.items():
            setattr(self, key, value)

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, guidance: Guidance, x_T: torch.Tensor, labels: torch.Tensor,
               generators: Sequence[torch.Generator] | None = None,
               on_step: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Integrate from x_T down to the data; returns (x0, network evaluations per sample: a float, or a (batch,)
        tensor where the guidance spends different amounts on different samples).

        x_T is standard normal noise; it starts at the first level's noise scale (noise, 1 on VP and flow models,
        sigma_max on EDM ones). Stochastic samplers draw each sample's fresh noise from its own generator, so that a
        sample does not depend on which batch it ran in.
        """
        levels = self.levels(denoiser)
        self.check(denoiser, guidance)
        guidance.check(denoiser)
        shape = x_T.shape[1:]

        def noise() -> torch.Tensor:
            if generators is None:
                raise ValueError(f"{self.name} is stochastic: pass one generator per sample")
            return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(x_T.device)

        self.reset()
        guidance.begin(denoiser, labels, levels, noise)
        repeats = guidance.recurrence
        # a discrete VP model starts from x_T itself (as DDIMPipeline and DiTPipeline do); a continuous one from the
        # first level's noise scale (EDM: sigma_max x_T, as edm2 and k-diffusion do; a flow model's tau = 1: x_T)
        x = x_T * levels[0].noise if denoiser.schedule.continuous else x_T
        spent = [0.0]

        def predict(x_at: torch.Tensor, level: Level, level_next: Level) -> tuple[torch.Tensor, GuidedPrediction]:
            """The finalized guided prediction at (x_at, level), its NFE counted, and the point the step starts
            from (where the guidance moved x_t, that point)."""
            raw = guidance(denoiser, x_at, level, labels)
            x_at = x_at if raw.x is None else raw.x
            pred = self._finalize(denoiser, x_at, level, level_next, raw)
            spent[0] = spent[0] + pred.nfe
            return x_at, pred

        try:
            for i, t in enumerate(levels):
                t_next = levels[i + 1] if i + 1 < len(levels) else CLEAN
                for r in range(repeats):
                    history = self.history()
                    denoiser.capture_variance(self.uses_model_variance)  # records this prediction's forwards only
                    x_at, pred = predict(x, t, t_next)
                    if self.uses_model_variance:
                        pred.log_variance = self.model_log_variance(denoiser, guidance, labels, levels, i)
                    after = levels[i + 2] if i + 2 < len(levels) else CLEAN
                    x_next = self.update(denoiser, x_at, t, t_next, pred, noise,
                                         lambda x_b, level: predict(x_b, level, after)[1])
                    if r + 1 < repeats:
                        # Self-recurrence: back to level t with fresh noise, and the multistep history as it was.
                        ratio, variance = transition(t, t_next)
                        x = ratio * x_next + variance ** 0.5 * noise()
                        self.restore(history)
                x = x_next
                if on_step is not None:
                    on_step(i + 1, len(levels))
        finally:
            denoiser.capture_variance(False)
        return x, spent[0]
