"""Universal / training-free guidance in TFG's unified form (Ye et al. 2024, "TFG: Unified Training-Free Guidance
for Diffusion Models"; Bansal et al. 2023's Universal Guidance is the case of its forward (rho), backward (mu) and
self-recurrence terms), with an off-the-shelf clean-image classifier f applied to the denoised estimate.

At a step from level t to level t_next, with x0 = x0(x_t) the estimate of the (unconditional) model, clipped to the
data range, a_t the cumulative alphas and alpha = a_t / a_next the step's own alpha:
    log f~(x0)  = log mean_m p_f(y | x0 + s_t delta_m),  delta_m ~ N(0, I)       (smoothing, `mc_samples` draws)
    D_t  = rho_t grad_{x_t} log f~(x0(x_t))                 (variance guidance: backpropagated through the model)
    D_0  = z_K - x0 after K = `iter_steps` steps z <- z + mu_t grad_z log f~(z) from z = x0  (mean guidance on x0)
    x_next = Step(x_t, x0, eps) + D_t / sqrt(alpha) + sqrt(a_next) D_0
and with `recurrence` = N the step is taken N times, re-noising x_next back to level t in between. For DDIM/DDPM,
Step(x0 + d, eps) = Step(x0, eps) + sqrt(a_next) d, so both moves are an x0 offset d = D_0 + D_t / sqrt(a_t)
(eps held: D_t is a move of x_t itself), added after the sampler clips x0, as TFG's reference code does. Other
samplers receive the same x0 offset.

Strength schedules over the sampler's own steps i, normalised to mean 1 (TFG): increase = alpha_i,
decrease = 1 - alpha_i, constant = 1; the smoothing s_t = sigma sqrt(1 - a_t) (decrease) or sigma (constant).
`scale` multiplies rho and mu. Written here because no library ships it: TFG's code is a research script.
NFE per step: 1 forward, plus 1 for the backward through the model when rho != 0; times `recurrence`. The
classifier's forwards and backwards are not counted (they are not the diffusion model's).
"""

import math

import torch

from diffguide.classifiers.clean import CleanClassifier
from diffguide.errors import UserError
from diffguide.guidance.base import Guidance, GuidedPrediction
from diffguide.models.schedules import CLEAN

SCHEDULES = ("increase", "decrease", "constant")
SIGMA_SCHEDULES = ("decrease", "constant")


class UniversalGuidance(Guidance):
    name = "universal"
    revision = 1  # 1: mean guidance keeps the classifier's gradient at saturated pixels

    def __init__(self, classifier: CleanClassifier, scale: float = 1.0, rho: float = 1.0, mu: float = 0.25,
                 sigma: float = 0.001, mc_samples: int = 1, iter_steps: int = 4, recurrence: int = 1,
                 rho_schedule: str = "increase", mu_schedule: str = "increase", sigma_schedule: str = "decrease",
                 conditional_model: bool = False):
        if not isinstance(classifier, CleanClassifier):
            raise UserError("guidance=universal needs a clean-image classifier: choose one with classifier=NAME")
        for key, value, allowed in (("rho_schedule", rho_schedule, SCHEDULES), ("mu_schedule", mu_schedule, SCHEDULES),
                                    ("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES)):
            if value not in allowed:
                raise UserError(f"guidance=universal: {key} {value!r} is not one of {', '.join(allowed)}")
        for key, value in (("mc_samples", mc_samples), ("recurrence", recurrence)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"guidance=universal: {key} must be a whole number >= 1 (got {value!r})")
        if not isinstance(iter_steps, int) or iter_steps < 0:
            raise UserError(f"guidance=universal: iter_steps must be a whole number >= 0 (got {iter_steps!r})")
        for key, value in (("rho", rho), ("mu", mu), ("sigma", sigma)):
            if not math.isfinite(value) or value < 0:
                raise UserError(f"guidance=universal: {key} must be finite and >= 0 (got {value})")
        self.classifier, self.scale = classifier, self.check_scale(self.name, scale)
        self.rho, self.mu, self.sigma = float(rho), float(mu), float(sigma)
        self.mc_samples, self.iter_steps, self.recurrence = mc_samples, iter_steps, recurrence
        self.rho_schedule, self.mu_schedule, self.sigma_schedule = rho_schedule, mu_schedule, sigma_schedule
        self.conditional_model = conditional_model

    def check(self, denoiser):
        self.check_classes(self.classifier, denoiser)
        self.classifier.attach(denoiser)

    # --- schedules over the sampler's steps -------------------------------------------------------------------
    def _step_alphas(self, denoiser) -> list[float]:
        if not self.levels:
            raise RuntimeError("guidance=universal: call begin() with the sampler's levels first")
        nexts = self.levels[1:] + [CLEAN]
        return [denoiser.alpha(t) / denoiser.alpha(n) for t, n in zip(self.levels, nexts)]

    def strength(self, denoiser, t: int, base: float, schedule: str) -> float:
        """base * schedule(step of t), the schedule normalised to mean 1 over the trajectory (TFG's get_rho/get_mu)."""
        alphas = self._step_alphas(denoiser)
        values = {"increase": alphas, "decrease": [1 - a for a in alphas], "constant": [1.0] * len(alphas)}[schedule]
        total = sum(values)
        if total == 0:
            return 0.0
        return base * values[self.step_index(denoiser, t)] * len(values) / total

    def smoothing(self, denoiser, t: int) -> float:
        return self.sigma * ((1 - denoiser.alpha(t)) ** 0.5 if self.sigma_schedule == "decrease" else 1.0)

    # --- the smoothed log-likelihood --------------------------------------------------------------------------
    def log_f(self, x0: torch.Tensor, labels: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
        """log mean_m p(y | x0 + delta_m), per sample (deltas already scaled; [0] for no smoothing)."""
        logps = []
        for delta in deltas:
            logits = self.classifier.logits(x0 + delta).float()
            logps.append(torch.log_softmax(logits, dim=1).gather(1, labels.view(-1, 1)).squeeze(1))
        return torch.logsumexp(torch.stack(logps), dim=0) - math.log(len(deltas))

    def _deltas(self, denoiser, t: int, x: torch.Tensor) -> list[torch.Tensor]:
        std = self.smoothing(denoiser, t)
        if std == 0.0:
            return [torch.zeros_like(x)]
        if self.noise is None:
            raise RuntimeError("guidance=universal with sigma > 0 draws noise: begin() needs the sampler's noise")
        return [std * self.noise().to(x.dtype) for _ in range(self.mc_samples)]

    def __call__(self, denoiser, x, t, labels):
        condition = denoiser.condition(labels, self.conditional_model)
        rho = self.scale * self.strength(denoiser, t, self.rho, self.rho_schedule)
        mu = self.scale * self.strength(denoiser, t, self.mu, self.mu_schedule)
        deltas = self._deltas(denoiser, t, x)
        lo_hi = denoiser.data_range

        def estimate(x_in):
            pred = denoiser.predict(x_in, t, condition)
            return pred.eps, (pred.x0.clamp(*lo_hi) if lo_hi is not None else pred.x0)

        if rho != 0.0:
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                eps, x0 = estimate(x_in)
                (grad,) = torch.autograd.grad(self.log_f(x0, labels, deltas).sum(), x_in)
            delta_t, nfe = rho * grad.detach(), 2
            eps, x0 = eps.detach(), x0.detach()
        else:
            with torch.no_grad():
                eps, x0 = estimate(x)
            delta_t, nfe = torch.zeros_like(x), 1

        z = x0.clone()
        if mu != 0.0:
            for _ in range(self.iter_steps):
                with torch.enable_grad():
                    z_in = z.detach().requires_grad_(True)
                    (grad,) = torch.autograd.grad(self.log_f(z_in, labels, deltas).sum(), z_in)
                z = z + mu * grad.detach()
        # TFG steps from the clipped x0 with the eps consistent with it, then adds the two moves.
        eps = denoiser.eps_from_x0(x, t, x0) if lo_hi is not None else eps
        # the variance guidance's move of x_t seen in x0 (delta_t / alpha); none where alpha = 0 (a flow model's pure
        # noise at tau = 1, whose x0 estimate no move of x_t changes in this sense)
        alpha = denoiser.level(t).alpha
        offset = (z - x0) + (delta_t / alpha if alpha > 0 else 0.0)
        return GuidedPrediction(x0, eps, nfe, consistent=True, x0_offset=offset)
