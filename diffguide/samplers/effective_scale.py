"""CFG++'s guidance, read as CFG's: the effective CFG weight of each CFG++ DDIM step.

In EDM coordinates (x / sqrt(a), sigma = sqrt((1 - a) / a)), one CFG++ DDIM step from sigma to sigma_next is
    x_next = x - (sigma - sigma_next) eps_u - sigma lambda (eps_c - eps_u),
and one CFG step with weight w is x - (sigma - sigma_next) (eps_u + w (eps_c - eps_u)): the two are the same step when
    w_t = lambda sigma / (sigma - sigma_next)
(before clipping of x0). Prints w_t at every step of the embedded model's DDIM trajectory for each lambda, their
median, the number of steps below w = 1 (weaker than the conditional model), and the lambda whose median w_t equals
each CFG weight asked for, so that CFG++ and CFG can be compared at matched effective guidance.

(scripts/cfgpp_effective_scale.py prints these for the embedded model.)
"""

import statistics

from diffguide.samplers.ddim import DDIM


def effective_weights(denoiser, steps: int, lam: float, spacing: str = "trailing") -> list[tuple[int, float]]:
    """(t, w_t) for every step of DDIM's trajectory; the last step goes to sigma = 0, where w_t = lambda."""
    timesteps = DDIM(steps, spacing=spacing).timesteps(denoiser)
    nexts = timesteps[1:] + [-1]
    return [(t, lam * denoiser.sigma(t) / (denoiser.sigma(t) - denoiser.sigma(n))) for t, n in zip(timesteps, nexts)]


def median_weight(denoiser, steps: int, lam: float) -> float:
    return statistics.median(w for _, w in effective_weights(denoiser, steps, lam))


def matching_lambda(denoiser, steps: int, target: float) -> float:
    """The lambda whose median effective weight is `target` (w_t is linear in lambda)."""
    return target / median_weight(denoiser, steps, 1.0)
