"""The sampling loop shared by every sampler; each sampler file supplies its timesteps and its update rule.

The update rules are written here rather than taken from diffusers' `step` because a diffusers scheduler derives
both the data estimate and the re-noising direction from one model output, and guidance methods such as CFG++ need
the two to differ. diffusers still supplies the timestep schedules, and tests check each rule against its step.
"""

from typing import Callable, Sequence

import torch

from diffguide.errors import UserError
from diffguide.guidance.base import Guidance, GuidedPrediction
from diffguide.models.denoiser import Denoiser

SPACINGS = ("leading", "trailing", "linspace")


class Sampler:
    name = "sampler"
    scheduler_class = None  # the diffusers scheduler whose timestep schedule this sampler follows

    def __init__(self, steps: int, spacing: str = "trailing", clip_x0: bool = True):
        if not isinstance(steps, int) or steps < 1:
            raise UserError(f"steps must be a whole number >= 1 (got {steps!r})")
        if spacing not in SPACINGS:
            raise UserError(f"sampler spacing {spacing!r} is not one of {', '.join(SPACINGS)}")
        self.steps, self.spacing, self.clip_x0 = steps, spacing, clip_x0

    def check(self, denoiser: Denoiser) -> None:
        if self.steps > denoiser.num_train_timesteps:
            raise UserError(f"steps={self.steps} exceeds the model's {denoiser.num_train_timesteps} training timesteps")

    def timesteps(self, denoiser: Denoiser) -> list[int]:
        """Descending timesteps from the matching diffusers scheduler, for the denoiser's own training schedule."""
        self.check(denoiser)
        scheduler = self.scheduler_class.from_config(denoiser.scheduler_config, timestep_spacing=self.spacing)
        scheduler.set_timesteps(self.steps)
        return [int(t) for t in scheduler.timesteps]

    #: True for samplers that draw x_next from the Gaussian posterior q(x_next | x_t, x0) (DDPM): a guidance
    #: `score` moves their mean (guided-diffusion's condition_mean) instead of their eps.
    ancestral = False
    #: True for a sampler that steps with the model's learned variance (DDPM's variance=learned): `sample` then
    #: records the variance channels of the denoiser's forwards during each guidance call and sets the prediction's
    #: `log_variance` from `model_log_variance`.
    uses_model_variance = False

    def model_log_variance(self, denoiser: Denoiser, guidance: Guidance, labels: torch.Tensor,
                           timesteps: list[int], i: int) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def posterior_variance(denoiser: Denoiser, t: int, t_next: int) -> float:
        """Sigma_t: the variance of q(x_next | x_t, x0) for the step t -> t_next of this (respaced) trajectory,
        beta_step (1 - a_next) / (1 - a_t) with beta_step = 1 - a_t / a_next; 0 on the last step (to the data)."""
        a_t, a_next = denoiser.alpha(t), denoiser.alpha(t_next)
        return (1 - a_next) / (1 - a_t) * (1 - a_t / a_next)

    def _finalize(self, denoiser: Denoiser, x: torch.Tensor, t: int, t_next: int,
                  pred: GuidedPrediction) -> GuidedPrediction:
        """Clip x0 to the model's data range where asked (pixel models), keeping eps consistent with it; then apply
        the guidance's score in the sampler's form (see GuidedPrediction.score) and add its x0_offset, neither of
        which the clipping may cut."""
        x0, eps, score = pred.x0, pred.eps, pred.score
        if self.clip_x0 and pred.clip and denoiser.data_range is not None:
            x0 = x0.clamp(*denoiser.data_range)
            if pred.consistent:
                eps = denoiser.eps_from_x0(x, t, x0)
        if score is not None and not self.ancestral:
            variance = self.posterior_variance(denoiser, t, t_next)
            factor = (variance + pred.score_boost) / variance if variance > 0 else 1.0
            eps = eps - (1 - denoiser.alpha(t)) ** 0.5 * factor * score
            x0 = denoiser.x0_from_eps(x, t, eps)
            score = None
        if pred.x0_offset is not None:
            x0 = x0 + pred.x0_offset
        return GuidedPrediction(x0, eps, pred.nfe, pred.consistent and pred.x0_offset is None, score=score,
                                score_boost=pred.score_boost)

    def update(self, denoiser: Denoiser, x: torch.Tensor, t: int, t_next: int, pred: GuidedPrediction,
               noise: Callable[[], torch.Tensor]) -> torch.Tensor:
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

        Stochastic samplers draw each sample's fresh noise from its own generator, so that a sample does not depend
        on which batch it ran in.
        """
        timesteps = self.timesteps(denoiser)
        shape = x_T.shape[1:]

        def noise() -> torch.Tensor:
            if generators is None:
                raise ValueError(f"{self.name} is stochastic: pass one generator per sample")
            return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(x_T.device)

        self.reset()
        guidance.begin(denoiser, labels, timesteps, noise)
        repeats = guidance.recurrence
        x, nfe = x_T, 0.0
        try:
            for i, t in enumerate(timesteps):
                t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
                for r in range(repeats):
                    history = self.history()
                    denoiser.capture_variance(self.uses_model_variance)  # records this prediction's forwards only
                    pred = guidance(denoiser, x, t, labels)
                    x_at = x if pred.x is None else pred.x  # where the guidance moved x_t, the step starts from there
                    pred = self._finalize(denoiser, x_at, t, t_next, pred)
                    if self.uses_model_variance:
                        pred.log_variance = self.model_log_variance(denoiser, guidance, labels, timesteps, i)
                    nfe = nfe + pred.nfe
                    x_next = self.update(denoiser, x_at, t, t_next, pred, noise)
                    if r + 1 < repeats:
                        # Self-recurrence: back to level t with fresh noise, and the multistep history as it was.
                        step_alpha = denoiser.alpha(t) / denoiser.alpha(t_next)
                        x = step_alpha ** 0.5 * x_next + (1 - step_alpha) ** 0.5 * noise()
                        self.restore(history)
                x = x_next
                if on_step is not None:
                    on_step(i + 1, len(timesteps))
        finally:
            denoiser.capture_variance(False)
        return x, nfe
