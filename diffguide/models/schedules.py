"""The noise-level axis every sampler, guidance method and model family shares.

A noise level is where a noisy sample sits: in the model's own coordinates x = alpha x0 + noise eps, and in EDM's
sense at sigma = noise / alpha (x / alpha = x0 + sigma eps). `Level` carries both, plus the model's own time t (the
network's time input before any scaling): a discrete VP model's integer timestep (or a fractional one between its
grid points), a flow model's tau in [0, 1], an EDM model's sigma. Samplers work in the model's own coordinates with
(alpha, noise), which stays finite where sigma does not (a flow model's tau = 1 has alpha = 0, sigma = inf).

A `Schedule` is a model family's map between its time and the level, and its grid of levels for a sampler: the
discrete VP families take the timesteps (and, for the sigma-space samplers, the sigmas) of the diffusers scheduler each
sampler follows, so they keep their exact timesteps; flow models take FlowMatchEulerDiscreteScheduler's grid and EDM
models EDMEulerScheduler's (Karras et al.'s rho = 7 grid).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Level:
    alpha: float   # scale of the data in the model's coordinates
    noise: float   # standard deviation of the noise in the model's coordinates
    t: float       # the model's own time (-1: the clean data of a discrete model)

    @property
    def sigma(self) -> float:
        """EDM's noise level noise / alpha (inf where alpha = 0)."""
        return math.inf if self.alpha == 0 else self.noise / self.alpha

    @property
    def snr_alpha(self) -> float:
        """The VP alpha-bar of the same signal-to-noise ratio: alpha^2 / (alpha^2 + noise^2)."""
        return self.alpha ** 2 / (self.alpha ** 2 + self.noise ** 2)

    @property
    def norm(self) -> float:
        """sqrt(alpha^2 + noise^2): x / norm is the VP state of the same level."""
        return math.hypot(self.alpha, self.noise)

    @property
    def clean(self) -> bool:
        return self.noise == 0


CLEAN = Level(1.0, 0.0, -1)


def _accepted(scheduler_class, config: dict) -> dict:
    """The keys of a scheduler config that `scheduler_class` takes, every one explicit: diffusers' from_config
    silently replaces the keys a config lists in `_use_default_values` by the class's own defaults (HeunDiscrete's
    beta_start is Stable Diffusion's), and warns on stderr of keys the class does not take."""
    import inspect

    keys = inspect.signature(scheduler_class.__init__).parameters
    return {k: v for k, v in dict(config).items() if k in keys}


def transition(level: Level, lower: Level) -> tuple[float, float]:
    """(ratio, variance) of the forward process from the lower noise level to `level`:
    x_level = ratio x_lower + sqrt(variance) z with ratio = alpha / alpha_lower, variance = noise^2 - ratio^2 noise_lower^2
    (VP: ratio^2 = a_t / a_s and variance = 1 - a_t / a_s)."""
    ratio = level.alpha / lower.alpha
    return ratio, max(level.noise ** 2 - ratio ** 2 * lower.noise ** 2, 0.0)


def posterior_variance(level: Level, lower: Level) -> float:
    """The variance of q(x_lower | x_level, x0): transition variance * noise_lower^2 / noise^2 (DDPM's beta-tilde on
    a respaced VP trajectory); 0 on the step to the clean data."""
    _, variance = transition(level, lower)
    return variance * lower.noise ** 2 / level.noise ** 2


class Schedule:
    #: the velocity of the probability-flow ODE in the family's solver coordinates y = x / c over u (see `coords`)
    #: is a1 x0 + b1 eps: (0, 1) for EDM's (x / alpha, sigma), (-1, 1) for a flow's (x, tau)
    velocity_coefficients = (0.0, 1.0)
    continuous = True

    def level(self, t) -> Level:
        raise NotImplementedError

    def at_sigma(self, sigma: float) -> Level:
        raise NotImplementedError

    def grid(self, scheduler_class, steps: int, spacing: str) -> list[Level]:
        """The descending levels a sampler visits (the clean level not included)."""
        raise NotImplementedError

    def coords(self, level: Level) -> tuple[float, float]:
        """(c, u): a second-order ODE solver (Heun) integrates y = x / c over u, the family's own ODE variables."""
        return level.alpha, level.sigma

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time input the network was trained with, from the model's time."""
        return t


class DiscreteVP(Schedule):
    """A discrete VP schedule alphas_cumprod[t], t = 0..T-1 (DDPM, DiT, the embedded UNet)."""

    continuous = False

    def __init__(self, alphas_cumprod: torch.Tensor, scheduler_config: dict):
        self.alphas_cumprod = alphas_cumprod.to(torch.float64).cpu()
        self.scheduler_config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        self.log_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).log().numpy()

    def level(self, t) -> Level:
        if isinstance(t, Level):
            return t
        if t < 0:
            return CLEAN
        if float(t) == int(t):
            a = float(self.alphas_cumprod[int(t)])
            return Level(a ** 0.5, (1 - a) ** 0.5, int(t))
        sigma = float(np.exp(np.interp(float(t), np.arange(len(self.log_sigmas)), self.log_sigmas)))
        return self._level(sigma, float(t))

    @staticmethod
    def _level(sigma: float, t: float) -> Level:
        alpha = 1 / (1 + sigma ** 2) ** 0.5
        return Level(alpha, sigma * alpha, t)

    def time_of(self, sigma: float) -> float:
        """The (fractional) timestep of an EDM sigma: log-sigma interpolated between grid points (k-diffusion's
        DiscreteSchedule.sigma_to_t, diffusers' EulerDiscreteScheduler._sigma_to_t)."""
        log_sigma = math.log(max(sigma, 1e-10))
        t = float(np.interp(log_sigma, self.log_sigmas, np.arange(len(self.log_sigmas))))
        return float(round(t)) if abs(t - round(t)) < 1e-9 else t

    def at_sigma(self, sigma: float) -> Level:
        return CLEAN if sigma == 0 else self._level(sigma, self.time_of(sigma))

    def grid(self, scheduler_class, steps, spacing):
        scheduler = scheduler_class.from_config(_accepted(scheduler_class, self.scheduler_config),
                                                timestep_spacing=spacing)
        scheduler.set_timesteps(steps)
        timesteps = [float(t) for t in scheduler.timesteps]
        sigmas = getattr(scheduler, "sigmas", None)
        if sigmas is None:  # DDIM, DDPM: integer timesteps
            return [self.level(int(t)) for t in timesteps]
        levels = []
        for t, sigma in zip(timesteps, (float(s) for s in sigmas)):
            if levels and levels[-1].t == t:  # Heun's grid lists each inner level twice (its two evaluations)
                continue
            exact = t == int(t) and abs(self.level(int(t)).sigma - sigma) <= 1e-5 * sigma
            levels.append(self.level(int(t)) if exact else self._level(sigma, t))
        return levels


class FlowSchedule(Schedule):
    """Rectified flow / flow matching: x = (1 - tau) x0 + tau eps, tau in [0, 1]; the network's time input is
    num_train_timesteps * tau (diffusers' FlowMatchEulerDiscreteScheduler)."""

    velocity_coefficients = (-1.0, 1.0)

    def __init__(self, scheduler_config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler_config = _accepted(FlowMatchEulerDiscreteScheduler, scheduler_config)
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))

    def level(self, t) -> Level:
        if isinstance(t, Level):
            return t
        tau = float(t)
        return CLEAN if tau <= 0 else Level(1 - tau, tau, tau)

    def at_sigma(self, sigma):
        return CLEAN if sigma == 0 else self.level(1.0 if math.isinf(sigma) else sigma / (1 + sigma))

    def grid(self, scheduler_class, steps, spacing):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        return [self.level(float(tau)) for tau in scheduler.sigmas[:-1]]

    def coords(self, level):
        return 1.0, level.t if level.t >= 0 else 0.0

    def network_time(self, t):
        return t * self.num_train_timesteps


class EDMSchedule(Schedule):
    """EDM (Karras et al. 2022): x = x0 + sigma eps, the model's time is sigma itself; the grid is EDMEulerScheduler's
    (sigma_min, sigma_max, rho)."""

    def __init__(self, scheduler_config: dict):
        self.scheduler_config = dict(scheduler_config)

    def level(self, t) -> Level:
        if isinstance(t, Level):
            return t
        return CLEAN if float(t) <= 0 else Level(1.0, float(t), float(t))

    def at_sigma(self, sigma):
        return self.level(sigma)

    def network_time(self, t):
        """EDM's c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1)."""
        return t.log() / 4

    def grid(self, scheduler_class, steps, spacing):
        from diffusers import EDMEulerScheduler

        scheduler = EDMEulerScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        return [self.level(float(s)) for s in scheduler.sigmas[:-1]]
