"""Time-step guidance (Sadat, Kansy, Hilliges & Weber, "No Training, No Problem: Rethinking Classifier-Free Guidance
for Diffusion Models", ICLR 2025, arXiv 2407.02687; Sec. 5 and its Algorithm 2).

The weak branch is the same network, same condition, with its timestep EMBEDDING perturbed by Gaussian noise:

    t_emb~ = t_emb + s t^alpha n,   n ~ N(0, I)
    D_TSG(z_t, t, y) = D(z_t, t_emb~, y) + w (D(z_t, t_emb, y) - D(z_t, t_emb~, y))

so it needs neither a null class nor a condition, and guides unconditional networks too. (Sec. 5 motivates it with a
perturbed time t + Delta t and a first-order expansion, grad log p~ = grad log p + (1 - w) / sigma(t)^2
dD/dt Delta t; what it runs is the embedding perturbation above.) Taken here, as CFG is, on the network's own output.

Where the noise goes: on the output of the network's timestep embedding (the MLP after the sinusoidal projection),
before any class embedding is added to it, as each family declares it (Denoiser.time_embeddings): UNet2DModel's
`time_embedding`; in diffusers' DiT every block's `norm1.emb.timestep_embedder`, not its label embedder. One n per
sample and step is added to every such module's output (block 0's embedder is called again for DiT's final layer
and gets the same n): facebookresearch/DiT has a single shared timestep embedding that all blocks and the final
layer read, which diffusers' per-block copies reproduce only when they are perturbed alike.

t in t^alpha is the model's time as a fraction of its range (a discrete model's timestep / num_train_timesteps, a
flow model's tau), so that s keeps the embedding's units at t = 1; alpha = 0 (the default) is the constant scale s.
The paper tunes s, alpha and the layers the perturbed embedding enters per model (its Table 6 ablation); those
values were not read here (the paper's text was available second-hand only: the equations above as the ICLR 2025
reviews and a public summary of it quote them), so the defaults (s = 1, alpha = 0,
every time embedding) are not the paper's: set them per model. n is drawn from the sampler's per-sample noise
source (each sample's own generator, standard normals of `noise()` draws), so a sample does not depend on its batch.

Cost: 2 evaluations per step, in one batched forward of [x; x] whose second half alone is perturbed (the hook adds
zero to the first half's embedding rows, exactly); a step whose weight w_t is exactly 1 (the unperturbed model)
spends 1. scale = w in CFG's convention (1: no guidance); `schedule` as for cfg (diffguide/guidance/weights.py).
model=gmm has no network and no time embedding: refused (no closed-form meaning).
"""

import math

import torch

from diffguide.errors import UserError
from diffguide.guidance.base import CFGLike, GuidedPrediction
from diffguide.guidance.combine import combine
from diffguide.models.parameterisation import Prediction
from diffguide.models.schedules import FlowSchedule


def time_fraction(denoiser, level) -> float | None:
    """The model's time at `level` as a fraction of its range, or None where it has no bounded time (EDM's sigma)."""
    if denoiser.num_train_timesteps:
        return min(max(float(level.t) / denoiser.num_train_timesteps, 0.0), 1.0)
    if isinstance(denoiser.schedule, FlowSchedule):
        return min(max(float(level.t), 0.0), 1.0)
    return None


class EmbeddingNoise:
    """n ~ N(0, I) of shape (batch, width) from the per-sample noise source, drawn once and reused for every
    time-embedding module of one forward (widened by further draws if a module is wider)."""

    def __init__(self, noise, batch: int):
        self.noise, self.batch, self.n = noise, batch, None

    def take(self, width: int) -> torch.Tensor:
        while self.n is None or self.n.shape[1] < width:
            draw = self.noise().flatten(1)
            if draw.shape[0] != self.batch:
                raise RuntimeError(f"the noise source gives {draw.shape[0]} samples, the batch has {self.batch}")
            self.n = draw if self.n is None else torch.cat([self.n, draw], 1)
        return self.n[:, :width]


class TSG(CFGLike):
    name = "tsg"
    #: the unconditional branch is the network with a perturbed time embedding, not the null class
    needs_null_class = False

    def __init__(self, scale: float, noise_scale: float = 1.0, alpha: float = 0.0, schedule=None):
        super().__init__(scale, schedule)
        for key, value in (("noise_scale", noise_scale), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise UserError(f"guidance=tsg: {key} must be a finite number >= 0 (got {value!r})")
        self.noise_scale, self.alpha = float(noise_scale), float(alpha)

    def check(self, denoiser):
        from diffguide.models.gmm import GaussianMixture

        if isinstance(denoiser, GaussianMixture):
            raise UserError("guidance=tsg perturbs the network's timestep embedding, and model=gmm is an exact "
                            "Gaussian mixture with no network: the method has no closed-form meaning there; use a "
                            "network model (model=fmnist_unet, fmnist_dit, dit_xl_2_256 or ddpm_cifar10)")
        if not denoiser.parts().time_embeddings:
            raise UserError(f"guidance=tsg perturbs the network's timestep embedding; model "
                            f"{type(denoiser).__name__} declares none (model=fmnist_unet, fmnist_dit, dit_xl_2_256 "
                            f"and ddpm_cifar10 do)")
        if self.alpha != 0.0 and not (denoiser.num_train_timesteps or isinstance(denoiser.schedule, FlowSchedule)):
            raise UserError(f"guidance=tsg: alpha={self.alpha} scales the noise by t^alpha, and model "
                            f"{type(denoiser).__name__} has no bounded time t; set guidance.alpha=0")

    def perturbation(self, denoiser, t, batch: int):
        """The function the time embeddings' outputs go through for a forward of [x; x] (2 batch rows): the second
        half's rows get s t^alpha n added, the first half's are left exactly as they are."""
        if self.noise is None:
            raise RuntimeError("guidance=tsg draws the embedding noise at every step: begin() needs the sampler's "
                               "per-sample noise source")
        fraction = time_fraction(denoiser, denoiser.level(t)) if self.alpha != 0.0 else 1.0
        factor = self.noise_scale * fraction ** self.alpha
        draws = EmbeddingNoise(self.noise, batch)

        def perturb(out: torch.Tensor) -> torch.Tensor:
            if out.ndim != 2 or out.shape[0] != 2 * batch:
                raise RuntimeError(f"guidance=tsg expects (batch, dim) time embeddings of {2 * batch} rows, got "
                                   f"{tuple(out.shape)}")
            n = draws.take(out.shape[1]).to(device=out.device, dtype=out.dtype)
            return out + torch.cat([torch.zeros_like(n), factor * n])

        return perturb

    def __call__(self, denoiser, x, t, labels):
        from diffguide.models import hooks

        w = self.weight(denoiser, t)
        condition = denoiser.condition(labels, True)
        if w == 1.0:
            return GuidedPrediction.of(denoiser.predict(x, t, condition), nfe=1)
        batch = x.shape[0]
        both = None if condition is None else torch.cat([condition, condition])
        with hooks.outputs_perturbed(denoiser.parts().time_embeddings, self.perturbation(denoiser, t, batch),
                                     name=type(denoiser).__name__, what="guidance=tsg"):
            pred = denoiser.predict(torch.cat([x, x]), t, both)
        cond = Prediction(pred.x0[:batch], pred.eps[:batch])
        perturbed = Prediction(pred.x0[batch:], pred.eps[batch:])
        return GuidedPrediction.of(combine(denoiser, x, t, perturbed, cond, w), nfe=2)
