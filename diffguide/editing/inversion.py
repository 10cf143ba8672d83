"""DDIM inversion of real images, CFG++ inversion, and null-text inversion, for class-conditional models.

The path. `levels` is a sampler's descending grid (`DDIM(steps).levels(denoiser)`, the clean level not included);
inversion walks it upwards, CLEAN -> levels[-1] -> ... -> levels[0], and regeneration walks it down again with the
deterministic DDIM step (eta = 0). Nothing is clipped: clipping x0 to the data range is not a bijection, so a clipped
step could not be undone (the inversion's x0 is not clipped either, as in diffusers' DDIMInverseScheduler with
clip_sample=False).

DDIM inversion (Song et al. 2021, eq. (13) read backwards; Mokady et al. 2023 Sec. 3 "DDIM inversion"): one step
from the lower level s to the higher level t is
    x0 = (x_s - noise_s eps) / alpha_s,        x_t = alpha_t x0 + noise_t eps,
with eps = eps_u + w (eps_c - eps_u) evaluated at the current (lower-noise) point x_s and the network time of the
target level t: the approximation eps(x_t, t) ~ eps(x_s, t) every reference implementation makes (diffusers'
DDIMInverseScheduler.step with the pipeline calling the model at the inverse scheduler's timestep; Mokady et al.'s
null_text_w_ptp.ipynb `ddim_loop`/`next_step`; CFG++'s latent_diffusion.py `inversion`), and the only one that works
on the first step, from the clean data, where eps at noise 0 is undefined. At w = 1 it is the conditional model alone
(one evaluation per step).

CFG++ inversion (Chung et al. 2024; the official code, github.com/CFGpp-diffusion/CFGpp at commit 8035352527eb,
latent_diffusion.py, class InversionDDIMCFGpp, method `inversion`, lines 905-908):
    noise_pred = noise_uc + cfg_guidance * (noise_c - noise_uc)
    z0t = (zt - (1-at_prev).sqrt() * noise_uc) / at_prev.sqrt()
    zt = at.sqrt() * z0t + (1-at).sqrt() * noise_pred
i.e. the roles of CFG++ sampling (x0 from eps_lam, re-noised with eps_u; lines 941-944) swapped: x0 from the
unconditional eps_u, re-noised with eps_lam. For fixed eps values this step is the exact algebraic inverse of the
CFG++ sampling step (as the CFG inversion step is of the CFG step); the only error of either is that the eps of the
inversion are evaluated at x_s rather than at x_t (tests/test_inversion.py measures both).

Null-text inversion (Mokady et al. 2023; google/prompt-to-prompt null_text_w_ptp.ipynb, `null_optimization`): the
pivot z*_0..z*_T is the DDIM inversion at w = 1; from z-bar_T = z*_T, at each step the null-class embedding phi_t
(initialised from phi_{t+1}, the first from the network's own null embedding) is optimised with Adam, lr
lr * (1 - i / (2 N)) at step i of N (the notebook's 1e-2 * (1 - i / 100) at its N = 50), for at most `inner_steps`
iterations, stopping once MSE(z*_{t-1}, DDIM_step(z-bar_t, phi_t, c, w)) < epsilon + i * 2e-5 (the loss computed
before that iteration's Adam step, which is still taken, as in the notebook); then z-bar_{t-1} is the step with the
optimised phi_t. Batched over images, one embedding per image per step: the batch's loss is the sum of the images'
own MSEs, so every row's gradient is its image's alone, Adam acts element-wise, and an image that reached its
threshold keeps its embedding while the others go on: each image gets exactly what it would get alone.
For a class-conditional network the "null text" is the null class's embedding: every module of
`denoiser.parts().label_embeddings` (the UNet's class_embedding; each DiT block's own label table) gets its own phi.
The exact mixture (diffguide/models/gmm.py) has no embedding and is refused (UserError).
"""

from dataclasses import dataclass
from typing import Sequence

import torch

from diffguide.errors import UserError
from diffguide.models.hooks import null_embeddings_replaced
from diffguide.models.schedules import CLEAN, Level

RULES = ("cfg", "cfgpp")


def initial_null_embeddings(denoiser, batch: int) -> list[torch.Tensor]:
    """Each label-embedding module's own output for the null class, (batch, dim) per module (detached copies)."""
    modules = denoiser.parts().label_embeddings
    labels = torch.full((batch,), denoiser.null_class, dtype=torch.long, device=denoiser.device)
    with torch.no_grad():
        return [module(labels).detach().float().clone() for module in modules]


# --- the steps --------------------------------------------------------------------------------------------------------


def _check(levels: Sequence[Level], rule: str, w: float) -> list[Level]:
    levels = list(levels)
    if not levels or any(level.clean for level in levels):
        raise ValueError("levels: the sampler's descending noise levels, the clean level not included")
    if rule not in RULES:
        raise UserError(f"rule={rule!r} is not one of {', '.join(RULES)}")
    return levels


def _eps(denoiser, x: torch.Tensor, level: Level, labels: torch.Tensor, w: float, rule: str):
    """(x0 of the step, eps of the x0 estimate, eps of the re-noising direction, network evaluations):
    cfg: both eps = eps_u + w (eps_c - eps_u) (w = 1: eps_c alone, one evaluation); cfgpp: eps_lam and eps_u."""
    if rule == "cfg" and w == 1.0:
        pred = denoiser.predict(x, level, labels)
        return pred.x0, pred.eps, pred.eps, 1
    uncond, cond = denoiser.pair(x, level, labels)
    eps = uncond.eps + w * (cond.eps - uncond.eps)
    x0 = uncond.x0 + w * (cond.x0 - uncond.x0)  # the x0 consistent with eps (both affine in the network output)
    if rule == "cfg":
        return x0, eps, eps, 2
    return x0, eps, uncond.eps, 2


def sample_step(x: torch.Tensor, t: Level, t_next: Level, eps_x0: torch.Tensor, eps_dir: torch.Tensor,
                x0: torch.Tensor | None = None) -> torch.Tensor:
    """The unclipped deterministic DDIM step t -> t_next (descending): x0 = (x - noise_t eps_x0) / alpha_t (or the
    given x0), x_next = alpha_next x0 + noise_next eps_dir. CFG: eps_x0 = eps_dir; CFG++: eps_lam, eps_u."""
    if x0 is None:
        x0 = (x - t.noise * eps_x0) / t.alpha
    return t_next.alpha * x0 + t_next.noise * eps_dir


def invert_step(x: torch.Tensor, s: Level, t: Level, eps_x0: torch.Tensor, eps_dir: torch.Tensor) -> torch.Tensor:
    """The exact algebraic inverse of `sample_step(., t, s, eps_x0, eps_dir)` for the same eps values: from the
    lower level s to the higher level t, x0 = (x_s - noise_s eps_dir) / alpha_s, x_t = alpha_t x0 + noise_t eps_x0."""
    x0 = (x - s.noise * eps_dir) / s.alpha
    return t.alpha * x0 + t.noise * eps_x0


@dataclass
class Inversion:
    """An inversion's trajectory: `xs[k]` is x at `path[k]`, path = [CLEAN, levels[-1], ..., levels[0]] (xs[0] the
    input, xs[-1] the inverted noise); `nfe`: network evaluations per image."""

    xs: list[torch.Tensor]
    path: list[Level]
    nfe: int

    @property
    def xT(self) -> torch.Tensor:
        return self.xs[-1]


@torch.no_grad()
def _invert(denoiser, x0: torch.Tensor, labels: torch.Tensor, levels: Sequence[Level], w: float,
            rule: str) -> Inversion:
    levels = _check(levels, rule, w)
    path = [CLEAN, *reversed(levels)]
    x, xs, nfe = x0, [x0], 0
    for s, t in zip(path[:-1], path[1:]):
        _, eps_x0, eps_dir, n = _eps(denoiser, x, t, labels, w, rule)  # at x_s, with the network time of t
        x = invert_step(x, s, t, eps_x0, eps_dir)
        xs.append(x)
        nfe += n
    return Inversion(xs, path, nfe)


def ddim_invert(denoiser, x0: torch.Tensor, labels: torch.Tensor, levels: Sequence[Level],
                w: float = 1.0) -> Inversion:
    """DDIM inversion with CFG weight w (w = 1: the conditional model alone)."""
    return _invert(denoiser, x0, labels, levels, float(w), "cfg")


def cfgpp_invert(denoiser, x0: torch.Tensor, labels: torch.Tensor, levels: Sequence[Level],
                 lam: float) -> Inversion:
    """CFG++ inversion (the official code's: x0 from eps_u, re-noised with eps_lam), lambda = `lam`."""
    return _invert(denoiser, x0, labels, levels, float(lam), "cfgpp")


def _null_context(denoiser, embeddings):
    from contextlib import nullcontext

    return nullcontext() if embeddings is None else null_embeddings_replaced(denoiser, embeddings)


@torch.no_grad()
def regenerate(denoiser, xT: torch.Tensor, labels: torch.Tensor, levels: Sequence[Level], w: float = 1.0,
               null_embeddings: Sequence[Sequence[torch.Tensor]] | None = None,
               rule: str = "cfg") -> tuple[torch.Tensor, int]:
    """Unclipped deterministic DDIM from xT (at levels[0]) to the data, with guidance `rule` (cfg: weight w; cfgpp:
    lambda w); `null_embeddings[i]` (one tensor per label-embedding module) replaces the null class's embedding at
    step i (levels[i] -> levels[i + 1]), as null-text inversion found them. Returns (x0, evaluations per image)."""
    levels = _check(levels, rule, w)
    if null_embeddings is not None and len(null_embeddings) != len(levels):
        raise ValueError(f"{len(null_embeddings)} steps of null embeddings for {len(levels)} levels")
    x, nfe = xT, 0
    for i, t in enumerate(levels):
        t_next = levels[i + 1] if i + 1 < len(levels) else CLEAN
        with _null_context(denoiser, None if null_embeddings is None else null_embeddings[i]):
            x0, eps_x0, eps_dir, n = _eps(denoiser, x, t, labels, float(w), rule)
        x = sample_step(x, t, t_next, eps_x0, eps_dir, x0)
        nfe += n
    return x, nfe


@dataclass
class NullTextInversion:
    """`embeddings[i]`: the optimised null embeddings of step i (levels[i] -> levels[i + 1]), one (batch, dim)
    tensor per label-embedding module; `loss_before` / `loss_after` (steps, batch): each image's MSE to the pivot
    with phi at its initial value and after optimisation; `iterations` (steps, batch): Adam steps taken; `pivot`:
    the w = 1 DDIM inversion; `nfe`: forward evaluations per image (pivot, optimisation and the final steps; the
    backward passes not counted)."""

    embeddings: list[list[torch.Tensor]]
    loss_before: torch.Tensor
    loss_after: torch.Tensor
    iterations: torch.Tensor
    pivot: Inversion
    nfe: int
    rule: str = "cfg"
    w: float = 1.0

    @property
    def xT(self) -> torch.Tensor:
        return self.pivot.xT


def require_label_embeddings(denoiser) -> None:
    if not denoiser.parts().label_embeddings or denoiser.null_class is None:
        raise UserError(f"inversion=null_text optimises the null class's embedding, and model "
                        f"{type(denoiser).__name__} has none (a network with a label embedding is needed: the UNet or "
                        f"DiT families); use inversion=ddim or inversion=cfgpp")


def null_text_invert(denoiser, x0: torch.Tensor, labels: torch.Tensor, levels: Sequence[Level], w: float,
                     inner_steps: int = 10, lr: float = 1e-2, epsilon: float = 1e-5,
                     rule: str = "cfg") -> NullTextInversion:
    """Null-text inversion at guidance weight w (see the module's docstring)."""
    require_label_embeddings(denoiser)
    levels = _check(levels, rule, w)
    w = float(w)
    pivot = ddim_invert(denoiser, x0, labels, levels, 1.0)
    batch, steps = x0.shape[0], len(levels)
    null = denoiser.null_labels(labels)
    phi = initial_null_embeddings(denoiser, batch)
    before = torch.zeros(steps, batch, dtype=torch.float64)
    after = torch.zeros(steps, batch, dtype=torch.float64)
    iterations = torch.zeros(steps, batch, dtype=torch.long)
    chosen: list[list[torch.Tensor]] = []
    x, nfe = pivot.xT, pivot.nfe

    def step(x_t, t, t_next, cond, params):
        with null_embeddings_replaced(denoiser, params):
            uncond = denoiser.predict(x_t, t, null)
        eps_lam = uncond.eps + w * (cond.eps - uncond.eps)
        x0_lam = uncond.x0 + w * (cond.x0 - uncond.x0)
        return sample_step(x_t, t, t_next, eps_lam, eps_lam if rule == "cfg" else uncond.eps, x0_lam)

    def mse(a, b):
        return (a - b).pow(2).flatten(1).mean(1)

    for i, t in enumerate(levels):
        t_next = levels[i + 1] if i + 1 < len(levels) else CLEAN
        target = pivot.xs[-2 - i]
        with torch.no_grad():
            cond = denoiser.predict(x, t, labels)
        nfe += 1
        params = [p.detach().clone().requires_grad_(True) for p in phi]
        optimizer = torch.optim.Adam(params, lr=lr * max(1.0 - i / (2.0 * steps), 0.0))
        active = torch.ones(batch, dtype=torch.bool, device=x.device)
        threshold = epsilon + i * 2e-5
        with torch.enable_grad():
            for j in range(inner_steps):
                loss = mse(step(x, t, t_next, cond, params), target)
                nfe += 1
                if j == 0:
                    before[i] = loss.detach().double().cpu()
                optimizer.zero_grad()
                loss.sum().backward()
                kept = [p.detach().clone() for p in params]
                optimizer.step()
                with torch.no_grad():
                    for p, k in zip(params, kept):  # images that stopped earlier keep their embedding
                        p[~active] = k[~active]
                iterations[i] += active.long().cpu()
                active &= ~(loss.detach() < threshold)
                if not bool(active.any()):
                    break
        phi = [p.detach() for p in params]
        chosen.append([p.clone() for p in phi])
        with torch.no_grad():
            x = step(x, t, t_next, cond, phi)
            after[i] = mse(x, target).double().cpu()
        nfe += 1
        if inner_steps == 0:
            before[i] = after[i]
    return NullTextInversion(chosen, before, after, iterations, pivot, nfe, rule, w)
