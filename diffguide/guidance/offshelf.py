"""Training-free guidance with an off-the-shelf classifier of clean images applied to the denoised estimate, with the
calibration and pre-conditioning choices studied by Ma et al. 2023 ("Elucidating the Design Space of
Classifier-Guided Diffusion Generation", EluCD).

score(y) = log [exp(t1 f_y(x0_hat)) / sum_k exp(t2 f_k(x0_hat))], t1 the joint temperature and t2 the marginal one
(EluCD: t2 = 0.5 t1); g = grad score, taken with respect to x0_hat (EluCD's DDPM path: no backprop through the
denoiser) or with respect to x_t through the denoiser (through_denoiser=true); optionally RMS-normalised per sample
(EluCD's EDM path). eps = eps_base - sqrt(1 - a_t) s_t g, with s_t = s (schedule constant) or EluCD's sine boost
s_t = s (1 + gamma max(Sigma) sin(pi t / T) / Sigma_t), Sigma_t the posterior variance of the sampler's own
(respaced) step from t to the next timestep, max over the trajectory, as EluCD's respaced sampler has them (in EluCD
the mean shift is (Sigma_t + gamma max(Sigma) sin(pi t / T)) s g). The update is written in the sampler-independent
eps form (DDIM's form of classifier guidance) rather than as a shift of the ancestral mean.
NFE: 1 forward, plus 1 for the backward pass through the denoiser where it is taken.
"""

import math

import torch

from diffguide.classifiers.clean import CleanClassifier
from diffguide.errors import UserError
from diffguide.guidance.base import Guidance

SCHEDULES = ("constant", "elucd_sine")


class OffTheShelfGuidance(Guidance):
    name = "offshelf"

    def __init__(self, classifier: CleanClassifier, scale: float, temperature: float = 1.0,
                 marginal_temperature: float | None = 0.5, through_denoiser: bool = False,
                 normalize_gradient: bool = False, schedule: str = "constant", gamma: float = 0.3,
                 conditional_model: bool = False):
        if not isinstance(classifier, CleanClassifier):
            raise UserError("guidance=offshelf needs a clean-image classifier: choose one with classifier=NAME")
        if schedule not in SCHEDULES:
            raise UserError(f"guidance=offshelf: schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
        if temperature <= 0 or (marginal_temperature is not None and marginal_temperature <= 0):
            raise UserError("guidance=offshelf: temperatures must be > 0")
        self.classifier, self.scale = classifier, self.check_scale(self.name, scale)
        self.t1 = float(temperature)
        # marginal_temperature is relative to the joint one (EluCD's "t2 = 0.5 t1"); None: the plain softmax.
        self.t2 = self.t1 * (1.0 if marginal_temperature is None else float(marginal_temperature))
        self.through_denoiser, self.normalize_gradient = through_denoiser, normalize_gradient
        self.schedule, self.gamma, self.conditional_model = schedule, float(gamma), conditional_model

    def start(self, denoiser, labels):
        self.check_classes(self.classifier, denoiser)
        self.classifier.attach(denoiser)
        # Sigma_t of each step: the sampler's trajectory when it has announced one (begin), else the full chain.
        steps = self.timesteps or list(range(denoiser.num_train_timesteps - 1, -1, -1))
        nexts = steps[1:] + [-1]
        self._posterior_var = {t: (1 - denoiser.alpha(n)) / (1 - denoiser.alpha(t)) * (1 - denoiser.alpha(t) /
                                                                                  denoiser.alpha(n))
                               for t, n in zip(steps, nexts)}
        self._max_var = max(self._posterior_var.values())

    def log_score(self, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        f = self.classifier.logits(x0).float()
        return self.t1 * f.gather(1, labels.view(-1, 1)).squeeze(1) - torch.logsumexp(self.t2 * f, dim=1)

    def step_scale(self, denoiser, t: int) -> float:
        if self.schedule == "constant":
            return self.scale
        sigma_t = self._posterior_var.get(t, 0.0)
        if sigma_t <= 0.0:  # the last step (to t = -1) has no posterior noise; EluCD's boost is sin(0) = 0 there too
            return self.scale
        boost = self.gamma * self._max_var * math.sin(math.pi * t / denoiser.num_train_timesteps) / sigma_t
        return self.scale * (1 + boost)

    def __call__(self, denoiser, x, t, labels):
        condition = denoiser.condition(labels, self.conditional_model)
        with torch.enable_grad():
            if self.through_denoiser:
                x_in = x.detach().requires_grad_(True)
                eps = denoiser(x_in, t, condition)
                score = self.log_score(denoiser.x0_from_eps(x_in, t, eps), labels).sum()
                (grad,) = torch.autograd.grad(score, x_in)
                eps, nfe = eps.detach(), 2
            else:
                with torch.no_grad():
                    eps = denoiser(x, t, condition)
                x0 = denoiser.x0_from_eps(x, t, eps).detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.log_score(x0, labels).sum(), x0)
                nfe = 1
        if self.normalize_gradient:
            rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
            grad = grad / rms.view(-1, *[1] * (grad.ndim - 1))
        eps = eps - (1 - denoiser.alpha(t)) ** 0.5 * self.step_scale(denoiser, t) * grad.detach()
        return self.from_eps(denoiser, x, t, eps, nfe=nfe)
