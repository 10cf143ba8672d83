"""The Guidance interface: what a sampler asks for at every step, and nothing about the sampler itself."""

import math
from dataclasses import dataclass
from typing import Callable

import torch

from diffguide.errors import UserError
from diffguide.guidance import weights
from diffguide.models.denoiser import Denoiser
from diffguide.models.parameterisation import Prediction
from diffguide.models.schedules import Level


@dataclass
class GuidedPrediction:
    """What the sampler integrates with.

    x0:  the data estimate the update moves towards (the guided x0).
    eps: the noise direction used to re-noise to the next level. For most methods it is the eps consistent with x0
         at x_t, i.e. (x_t - sqrt(a_t) x0) / sqrt(1 - a_t); CFG++ re-noises with the unconditional eps instead.
    nfe: network evaluations per sample spent on this prediction (2 for CFG: cond and uncond, even when batched);
         a float, or a (batch,) tensor for methods whose cost differs between samples.
    consistent: True when eps is the one consistent with x0 at x_t; a sampler that clips x0 then re-derives eps
         from the clipped x0 (as guided-diffusion does). CFG++ sets it False: its re-noising eps stays eps_u.
    x0_offset: a move of x0 made after the sampler's clipping of x0 to the data range, so that the clipping cannot
         cut it (TFG's mean and variance guidance: its reference code clips the unguided x0, then adds them).
    score: a classifier's scaled gradient s * g, applied after the sampler clips the model's x0, in the two forms
         of guided-diffusion (gaussian_diffusion.py): an ancestral sampler (ddpm) moves its mean by
         (Sigma_t + score_boost) * score (`condition_mean`; Sigma_t the step's variance); every other sampler
         subtracts sqrt(1 - a_t) * (Sigma_t + score_boost) / Sigma_t * score from the eps of the clipped x0
         (`condition_score`, the DDIM form; the factor is 1 when score_boost = 0). The clip never cuts it.
    score_boost: EluCD's added guidance variance gamma * max(Sigma) * sin(pi i / N) (0 for plain classifier
         guidance); it must be 0 on a step whose Sigma_t is 0 (the last one).
    x: the point the prediction was made at, when the guidance moved x_t itself before the network saw it
         (EluCD's EDM path); the sampler then steps from it. None: the sampler's own x_t.
    clip: False for a prediction the sampler must take as it is (CFG-Zero*'s zero velocity): no clipping of x0.
    log_variance: set by the sampler, never by a guidance method: the log of the step's variance from the model's
         learned-variance channels (sampler=ddpm sampler.variance=learned); None: the fixed posterior variance.
    """

    x0: torch.Tensor
    eps: torch.Tensor
    nfe: float | torch.Tensor = 0.0
    consistent: bool = True
    x0_offset: torch.Tensor | None = None
    score: torch.Tensor | None = None
    score_boost: float = 0.0
    x: torch.Tensor | None = None
    clip: bool = True
    log_variance: torch.Tensor | None = None

    @classmethod
    def of(cls, pred: Prediction, nfe: float | torch.Tensor, **kwargs) -> "GuidedPrediction":
        return cls(pred.x0, pred.eps, nfe, **kwargs)


class Guidance:
    """One method: the guided prediction at (x_t, level t) for class labels `labels`.

    `t` is a noise level (diffguide/models/schedules.py's Level; a model's own time is accepted where a caller has
    one): methods ask the denoiser for predictions there (`denoiser.predict`, `denoiser.pair`) and combine them as
    Predictions (x0 and eps together), so that one method works under every parameterisation and schedule.
    `check` runs once before any work (refusals: one line, before long work starts); `begin` once per trajectory
    batch (the levels the sampler will visit, its noise source, and the reset of per-trajectory state in `reset`).
    """

    name = "guidance"
    #: The scale in the method's own paper convention; None for methods without one.
    scale: float | None = None
    #: Raised when a correction changes the images this method makes with unchanged settings: it enters the run's
    #: fingerprint (when not 0), so that samples made before the correction are not resumed into the same run.
    revision: int = 0
    #: Self-recurrence (Universal Guidance, TFG): the sampler takes each step this many times, re-noising the result
    #: back to the step's noise level in between (x_t = sqrt(a_t / a_next) x_next + sqrt(1 - a_t / a_next) z).
    recurrence: int = 1
    #: the samplers this method has a form for (None: every sampler)
    samplers: tuple[str, ...] | None = None
    #: Set by `begin`: the trajectory's descending noise levels and the sampler's per-sample noise source.
    levels: list[Level] | None = None
    noise: Callable[[], torch.Tensor] | None = None

    #: how the scale varies over the trajectory (diffguide/guidance/weights.py); None: the constant `scale`
    schedule = None
    #: the scale at which the method does not guide, which a schedule leaves where the strength is 0
    #: (weights.py: w_t = neutral + (scale - neutral) f(p)): 1 for CFG's w (the conditional model) and the methods in
    #: its convention (CFG-rescale, CFG-Zero*, APG, ICG, TSG); 0 for CFG++'s lambda and a perturbation scale s
    neutral_scale: float = 1.0

    def set_schedule(self, schedule) -> None:
        """Take the `schedule` key of a CFG-like method's config (None: the constant scale). CFGLike.__init__
        calls this (after setting the scale); every method with a CFG-like scale reads its scale at a step through
        `weight`. A bad kind or key is refused here, in one line."""
        self.schedule = weights.make(self.name, schedule, self.neutral_scale)

    def weight(self, denoiser: Denoiser, t) -> float:
        """The scale at level t of the trajectory given to `begin`: `scale`, or the schedule's value there (exactly
        `neutral_scale` where the schedule does not guide, so that a method can spend fewer evaluations there)."""
        if self.schedule is None:
            return self.scale
        return self.schedule.weight(self.scale, denoiser.level(t), self.levels)

    def check(self, denoiser: Denoiser) -> None:
        """Refuse, in one line (UserError), a model this method cannot guide. Called once, before sampling."""

    def check_sampler(self, sampler, denoiser: Denoiser) -> None:
        """Refuse, in one line, a sampler this method cannot step with on this model (called by Sampler.check)."""

    def reset(self, denoiser: Denoiser, labels: torch.Tensor) -> None:
        """Forget per-trajectory state (momentum, a switch that stays off)."""

    def begin(self, denoiser: Denoiser, labels: torch.Tensor, levels: list,
              noise: Callable[[], torch.Tensor] | None = None) -> None:
        """Called by the sampler before a trajectory batch: the descending levels it will visit (Levels, or the
        model's own times; methods whose step sizes are normalised over the trajectory need them) and its per-sample
        noise source (for methods that draw noise: it keeps every sample independent of the batch it ran in)."""
        self.levels, self.noise = [denoiser.level(t) for t in levels], noise
        self.reset(denoiser, labels)

    def step_index(self, denoiser: Denoiser, t) -> int:
        """The index of level t in the trajectory given to `begin`."""
        return self.levels.index(denoiser.level(t))

    def __call__(self, denoiser: Denoiser, x: torch.Tensor, t, labels: torch.Tensor) -> GuidedPrediction:
        raise NotImplementedError

    @staticmethod
    def check_scale(name: str, scale, lo: float | None = None) -> float:
        if scale is None or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise UserError(f"guidance={name} needs a finite scale (got {scale!r})")
        if lo is not None and scale < lo:
            raise UserError(f"guidance={name}: scale must be >= {lo} (got {scale})")
        return float(scale)

    @staticmethod
    def check_classes(classifier, denoiser: Denoiser) -> None:
        """A guiding classifier must know the model's classes (any classes do for an unconditional model); a
        text-to-image model's conditions are prompts, which no class classifier can guide towards."""
        if getattr(denoiser, "conditioning", "class") == "text":
            raise UserError(f"a classifier guides towards class labels; model {type(denoiser).__name__} is "
                            f"conditioned on prompts: use a prompt-conditioned method (cfg, cfgpp, apg, pag, ...)")
        if denoiser.num_classes and classifier.num_classes != denoiser.num_classes:
            raise UserError(f"the classifier knows {classifier.num_classes} classes, the model "
                            f"{denoiser.num_classes}: choose a classifier of this model's classes with classifier=NAME "
                            f"(model=gmm: gmm_exact for guidance=classifier, gmm_clean for the others)")

    @staticmethod
    def require_null_class(name: str, denoiser: Denoiser) -> None:
        if denoiser.null_class is None:
            raise UserError(f"guidance={name} needs a model with a null class (unconditional prediction); "
                            f"this model has none")


class CFGLike(Guidance):
    """What every method with a CFG-like scale shares, written once, as diffusers' BaseGuidance does
    (guiders/guider_utils.py: `__init__(start, stop, enabled)`; classifier_free_guidance.py `_is_cfg_enabled`):
    the scale's check (finite, and >= `min_scale` where set), the weight schedule (`schedule`: `weight(denoiser, t)`
    is the scale at t), the null-class check of `check` (`needs_null_class`: False for methods whose unconditional
    branch is something else), and the window of the trajectory a term is used in (`set_window`, `active`). A
    method's own module holds only its rule, its own keys, and any further check (calling super().check)."""

    #: the lowest scale the method accepts (None: any finite scale)
    min_scale: float | None = None
    #: the method contrasts the conditional prediction with the null class's
    needs_null_class = True
    #: the window of the trajectory (fractions of its steps) where the method's term is used: every step by default
    start: float = 0.0
    stop: float = 1.0

    def __init__(self, scale: float, schedule=None):
        self.scale = self.check_scale(self.name, scale, lo=self.min_scale)
        self.set_schedule(schedule)

    def check(self, denoiser: Denoiser) -> None:
        if self.needs_null_class:
            self.require_null_class(self.name, denoiser)

    def set_window(self, start: float, stop: float) -> None:
        """Use the method's term at step i of N (the levels given to `begin`) when int(start N) < i < int(stop N),
        the window of diffusers' guiders (skip_layer_guidance.py `_is_slg_enabled`, whose strict first inequality
        leaves step 0 out even at start 0, as SD3's pipeline `i > num_inference_steps * skip_layer_guidance_start`
        does), except that start = 0 includes step 0, so that a term its paper applies at every step does so."""
        for key, value in (("start", start), ("stop", stop)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise UserError(f"guidance.{key} must be a fraction of the trajectory in [0, 1] (got {value!r})")
        if not start < 1.0 or not start <= stop:
            raise UserError(f"guidance={self.name}: needs 0 <= start < 1 and start <= stop <= 1 (got start={start}, "
                            f"stop={stop})")
        self.start, self.stop = float(start), float(stop)

    def active(self, denoiser: Denoiser, t) -> bool:
        """Whether the method's term is used at level t: inside the window (see `set_window`)."""
        if self.start == 0.0 and self.stop == 1.0:
            return True
        if not self.levels:
            raise ValueError(f"guidance={self.name} with start/stop needs the trajectory: call begin() first")
        sigma = denoiser.level(t).sigma
        i, n = sum(level.sigma > sigma for level in self.levels), len(self.levels)  # t's step (a Heun midpoint: next)
        return (self.start == 0.0 or int(self.start * n) < i) and i < int(self.stop * n)
