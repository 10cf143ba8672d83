"""Training-free guidance with an off-the-shelf classifier of clean images, with the calibration and
pre-conditioning choices of Ma et al. 2023 ("Elucidating the Design Space of Classifier-Guided Diffusion
Generation", EluCD; official code AlexMaOLS/EluCD).

Calibrated score (both paths): score(y) = log [exp(t1 f_y) / sum_k exp(t2 f_k)], t1 the joint temperature and
t2 = marginal_temperature * t1 the marginal one (EluCD's DDPM path: t2 = 0.5 t1; its EDM path: t2 = 0).

path = ddpm (EluCD's DDPM path, DDPM/guided_diffusion/gaussian_diffusion.py `p_sample` and
DDPM/scripts/classifier_sample.py `design_cond_fn`): g = grad of the score with respect to the model's x0 estimate,
clipped to the data range (no backprop through the denoiser; through_denoiser=true takes it with respect to x_t
through the model instead, at one more evaluation). On the ancestral sampler (sampler=ddpm) the mean moves by
    (Sigma_t + gamma max(Sigma) sin(pi i / N)) s g
with Sigma_t the step's posterior variance, max(Sigma) its running maximum over the steps taken so far, i the
step's index in the respaced chain (N - 1 first, 0 last) and N the number of steps: EluCD's `p_sample` exactly.
On the other samplers (DDIM, DPM-Solver++ 2M) this project's DDIM form: guided-diffusion's `condition_score`,
eps -= sqrt(1 - a_t) s_t g, with EluCD's step scale s_t = s (Sigma_t + gamma max(Sigma) sin(pi i / N)) / Sigma_t
(s on the last step, where both terms are 0). schedule = constant drops the sine term (gamma = 0).

path = edm (EluCD's EDM path, EDM/generate.py `edm_sampler`): before the network is evaluated, x moves in EDM
coordinates (x / sqrt(a_t)) by g' = g / rms(g) * rms(x) * c_k, where g is the score's gradient at x / max(rms(x), 1)
(the noisy image, RMS-normalised to at most 1), c_k = max(s (N + 1 - k) / (N + 1), 1e-5) + gamma s sin(pi k / N)
and k = 0 .. N - 1 the step counted from the noisiest; the step is then taken from the moved point. EluCD runs it
with EDM's Heun sampler; here it runs on this project's samplers, from the moved point. EluCD's ImageNet-64
setting: s (max_guidance) = 0.004, gamma (add_factor) = 0.3, t2 = 0, softplus beta 5, 10 steps.

NFE: 1 forward, plus 1 for the backward pass through the denoiser where it is taken.
"""

import math

import torch

from diffguide.classifiers.clean import CleanClassifier, clip_straight_through
from diffguide.errors import UserError
from diffguide.guidance.base import Guidance, GuidedPrediction
from diffguide.models.schedules import CLEAN, FlowSchedule, Level, posterior_variance

SCHEDULES = ("constant", "elucd_sine")
PATHS = ("ddpm", "edm")


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).pow(2).mean(1).sqrt().view(-1, *[1] * (v.ndim - 1))


def denoiser_level(steps, t):
    """The Level of step t (a Level, or a discrete model's timestep) among the trajectory's levels."""
    if not isinstance(t, Level):
        return next(level for level in steps if level.t == t)
    return t


class OffTheShelfGuidance(Guidance):
    name = "offshelf"
    revision = 1  # 1: EluCD's gradient at the clipped x0, its p_sample

    def __init__(self, classifier: CleanClassifier, scale: float, temperature: float = 1.0,
                 marginal_temperature: float | None = 0.5, through_denoiser: bool = False, path: str = "ddpm",
                 schedule: str = "elucd_sine", gamma: float = 0.3, conditional_model: bool = True):
        if not isinstance(classifier, CleanClassifier):
            raise UserError("guidance=offshelf needs a clean-image classifier: choose one with classifier=NAME")
        if schedule not in SCHEDULES:
            raise UserError(f"guidance=offshelf: schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
        if path not in PATHS:
            raise UserError(f"guidance=offshelf: path {path!r} is not one of {', '.join(PATHS)}")
        if temperature <= 0 or (marginal_temperature is not None and marginal_temperature < 0):
            raise UserError("guidance=offshelf: temperature must be > 0 and marginal_temperature >= 0")
        if path == "edm" and through_denoiser:
            raise UserError("guidance=offshelf: path=edm takes the gradient on the noisy image, "
                            "not through the denoiser (set through_denoiser=false)")
        self.classifier, self.scale = classifier, self.check_scale(self.name, scale)
        self.t1 = float(temperature)
        # marginal_temperature is relative to the joint one (EluCD's "t2 = 0.5 t1"); None: the plain softmax.
        self.t2 = self.t1 * (1.0 if marginal_temperature is None else float(marginal_temperature))
        self.through_denoiser, self.path = through_denoiser, path
        # its own key `schedule` (EluCD's constant | elucd_sine), not the CFG weight schedule of base.Guidance.weight
        self.elucd_schedule, self.gamma, self.conditional_model = schedule, float(gamma), conditional_model

    def check(self, denoiser):
        self.check_classes(self.classifier, denoiser)
        self.classifier.attach(denoiser)

    def check_sampler(self, sampler, denoiser):
        # This project's DDIM form divides EluCD's added variance by the step's posterior variance, which a flow
        # model's grid makes about a thousandth of the VP grid's near the data (tau 0.043 -> 0.001): x0 jumps there
        # (FID 134 measured on fmnist_flow). EluCD's own form, the ancestral mean move, has no such division.
        if (isinstance(denoiser.schedule, FlowSchedule) and not sampler.ancestral and self.path == "ddpm"
                and self.elucd_schedule != "constant"):
            raise UserError(f"guidance=offshelf on a flow model needs sampler=ddpm (EluCD's own form); its "
                            f"{sampler.name} form is ill-conditioned on the flow grid (or set guidance.schedule=constant)")

    def reset(self, denoiser, labels):
        self.check(denoiser)
        if not self.levels and denoiser.num_train_timesteps is None:
            raise RuntimeError("guidance=offshelf on a continuous-time model needs the sampler's levels (begin)")
        # the x0 estimate the gradient is taken at is clipped to the data range (EluCD: clip_denoised)
        self._data_range = denoiser.data_range if self.path == "ddpm" else None
        # Sigma_t of each step: the sampler's trajectory when it has announced one (begin), else the full chain.
        self._steps = self.levels or [denoiser.level(t) for t in range(denoiser.num_train_timesteps - 1, -1, -1)]
        nexts = self._steps[1:] + [CLEAN]
        variances = [posterior_variance(t, n) for t, n in zip(self._steps, nexts)]
        # EluCD keeps max(Sigma) as a running maximum over the steps taken (self.max_variance in p_sample).
        self._max_variance = {t: max(variances[:k + 1]) for k, t in enumerate(self._steps)}

    def log_score(self, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lo_hi = self._data_range
        f = self.classifier.logits(clip_straight_through(x0, *lo_hi) if lo_hi is not None else x0).float()
        return self.t1 * f.gather(1, labels.view(-1, 1)).squeeze(1) - torch.logsumexp(self.t2 * f, dim=1)

    def boost(self, t: int) -> float:
        """EluCD's DDPM-path added variance gamma max(Sigma) sin(pi i / N) at timestep t of the trajectory."""
        if self.elucd_schedule == "constant":
            return 0.0
        n, level = len(self._steps), denoiser_level(self._steps, t)
        i = n - 1 - self._steps.index(level)
        return max(math.sin(math.pi * i / n) * self._max_variance[level] * self.gamma, 0.0)

    def edm_strength(self, t: int) -> float:
        """c_k of EluCD's EDM path: linear decay from s plus gamma s sin(pi k / N), k counted from the first step."""
        n, k = len(self._steps), self._steps.index(denoiser_level(self._steps, t))
        sine = math.sin(math.pi * k / n) * self.scale * self.gamma if self.elucd_schedule == "elucd_sine" else 0.0
        return max(self.scale / (n + 1) * (n + 1 - k), 1e-5) + sine

    def __call__(self, denoiser, x, t, labels):
        condition = denoiser.condition(labels, self.conditional_model)
        if self.path == "edm":
            return self._edm(denoiser, x, t, labels, condition)
        with torch.enable_grad():
            if self.through_denoiser:
                x_in = x.detach().requires_grad_(True)
                prediction = denoiser.predict(x_in, t, condition)
                score = self.log_score(prediction.x0, labels).sum()
                (grad,) = torch.autograd.grad(score, x_in)
                nfe = 2
            else:
                with torch.no_grad():
                    prediction = denoiser.predict(x, t, condition)
                x0 = prediction.x0.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.log_score(x0, labels).sum(), x0)
                nfe = 1
        pred = GuidedPrediction(prediction.x0.detach(), prediction.eps.detach(), nfe)
        pred.score, pred.score_boost = self.scale * grad.detach(), self.boost(t)
        return pred

    def _edm(self, denoiser, x, t, labels, condition) -> GuidedPrediction:
        root_a = denoiser.level(t).alpha
        x_edm = x / root_a
        x_rms = _rms(x_edm)
        with torch.enable_grad():
            x_in = (x_edm / x_rms.clamp_min(1.0)).detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_score(x_in, labels).sum(), x_in)
        move = grad / _rms(grad).clamp_min(1e-12) * x_rms * self.edm_strength(t)
        x_hat = x + root_a * move.detach()
        pred = GuidedPrediction.of(denoiser.predict(x_hat, t, condition), nfe=1)
        pred.x = x_hat
        return pred
