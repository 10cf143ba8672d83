"""The Diffusion Classifier (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier"; official code
diffusion-classifier/diffusion-classifier, eval_prob_adaptive.py): a class-conditional diffusion model used as a
classifier of clean images, with no training.

For an image x0, fix pairs (t_j, eps_j), the same for every class; class c scores

    score_c = mean_j  mean_pixels (eps_j - eps_theta(x_t_j, t_j, c))^2,     x_t_j = sqrt(a_t) x0 + sqrt(1 - a_t) eps_j

(the official loss 'l2': `F.mse_loss(noise, noise_pred, reduction='none').mean(dim=(1, 2, 3))` in `eval_error`), and
the prediction is argmin_c score_c. The paper's posterior (Sec. 3) is
    p(c | x0) = exp(-E[||eps - eps_theta(x_t, c)||^2]) / sum_k exp(-E[||eps - eps_theta(x_t, k)||^2])
with the squared norm summed over pixels: `DiffusionClassifier.logits` = -(number of pixels) * score.

The pairs follow `eval_prob_adaptive`: with T training timesteps and m = max(n_samples),
    start = T // m // 2;  t_to_eval = list(range(start, T, T // m))[:m]
and the stage with n pairs evaluates `t_to_eval[len(t_to_eval) // n // 2::len(t_to_eval) // n][:n]`, less the
timesteps an earlier stage has evaluated already (their errors are reused). The j-th timestep evaluated (in the order
of evaluation, as the official `noise_idxs`) has noise j, drawn here from a generator seeded with `seed` (the same
for every image; the official script draws `all_noise` per image unless `--noise_path` is given). After stage i, the
to_keep[i] classes of lowest mean error over all pairs evaluated so far are kept (`torch.topk` of the negated
errors); the official CLI `--to_keep 5 1 --n_samples 50 500` costs 10 * 50 + 5 * 450 network evaluations per image
on 10 classes (one trial per timestep: the official `--n_trials 1`).

Only discrete-time models (a DDPM-style `alphas_cumprod`) are classified: the official timesteps are integers of the
training schedule. One forward evaluates one timestep for many (image, class) rows; `batch` caps the rows of a
forward.
"""

from dataclasses import dataclass
from typing import Sequence

import torch

from diffguide.classifiers.clean import CleanClassifier
from diffguide.errors import UserError


def stratified_timesteps(num_train_timesteps: int, max_n_samples: int) -> list[int]:
    """eval_prob_adaptive.py: `start = T // max_n_samples // 2; t_to_eval = list(range(start, T, T //
    max_n_samples))[:max_n_samples]`."""
    T, m = int(num_train_timesteps), int(max_n_samples)
    if not 1 <= m <= T:
        raise UserError(f"the Diffusion Classifier takes 1 to {T} pairs (one per training timestep); got {m}")
    return list(range(T // m // 2, T, T // m))[:m]


def stage_timesteps(t_to_eval: Sequence[int], n: int) -> list[int]:
    """The stage of n pairs: `t_to_eval[len(t_to_eval) // n_samples // 2::len(t_to_eval) // n_samples][:n_samples]`."""
    return list(t_to_eval[len(t_to_eval) // n // 2::len(t_to_eval) // n][:n])


def stage_plan(num_train_timesteps: int, n_samples: Sequence[int]) -> list[list[int]]:
    """The timesteps each stage evaluates anew (those of earlier stages are reused, not evaluated again), in order;
    the j-th timestep of the concatenation has noise j."""
    t_to_eval = stratified_timesteps(num_train_timesteps, max(n_samples))
    evaluated: set[int] = set()
    plan = []
    for n in n_samples:
        new = [t for t in stage_timesteps(t_to_eval, n) if t not in evaluated]
        evaluated.update(new)
        plan.append(new)
    return plan


def fixed_noises(shape: Sequence[int], count: int, seed: int) -> torch.Tensor:
    """(count, *shape) float32 standard normal draws from a CPU generator seeded with `seed`: the same for every image
    and every class."""
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(int(seed)))


def require_discrete(denoiser) -> int:
    """The model's number of training timesteps; a continuous-time model is refused in one line."""
    T = denoiser.num_train_timesteps
    if T is None:
        raise UserError(f"the Diffusion Classifier needs a discrete-time model (integer training timesteps, as "
                        f"DDPM's); {type(denoiser).__name__} is continuous-time (a flow or EDM model)")
    if not denoiser.num_classes:
        raise UserError("the Diffusion Classifier needs a class-conditional model; this one has no classes")
    return T


def pairs(denoiser, n: int, seed: int = 0) -> tuple[list[int], torch.Tensor]:
    """n (timestep, noise) pairs: the official stratified timesteps of a one-stage run (`--n_samples n`) and noises
    0..n-1 of the seed."""
    T = require_discrete(denoiser)
    (timesteps,) = stage_plan(T, [n])
    return timesteps, fixed_noises(denoiser.sample_shape, len(timesteps), seed)


def check_stages(n_samples: Sequence[int], to_keep: Sequence[int], num_classes: int, T: int | None = None) -> None:
    """The adaptive schedule's rules, each broken one refused in one line (UserError)."""
    n_samples, to_keep = list(n_samples), list(to_keep)
    if not n_samples or len(n_samples) != len(to_keep):
        raise UserError(f"n_samples and to_keep need one entry per stage, as many of each (got n_samples={n_samples}, "
                        f"to_keep={to_keep})")
    for key, values in (("n_samples", n_samples), ("to_keep", to_keep)):
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise UserError(f"{key}={values}: every entry must be a whole number >= 1")
    if any(b <= a for a, b in zip(n_samples, n_samples[1:])):
        raise UserError(f"n_samples={n_samples} must increase from stage to stage (each stage's count is the total "
                        f"of pairs, earlier stages' included)")
    if any(b >= a for a, b in zip(to_keep, to_keep[1:])):
        raise UserError(f"to_keep={to_keep} must decrease from stage to stage")
    if to_keep[-1] != 1:
        raise UserError(f"to_keep={to_keep} must end with 1 (the last stage keeps the predicted class)")
    if to_keep[0] > num_classes:
        raise UserError(f"to_keep={to_keep} keeps more classes than the model has ({num_classes})")
    if T is not None and n_samples[-1] > T:
        raise UserError(f"n_samples={n_samples}: at most {T} pairs (one per training timestep of the model)")


def pair_errors(denoiser, x0: torch.Tensor, classes, timesteps: Sequence[int], noises: torch.Tensor,
                batch: int | None = None) -> tuple[torch.Tensor, int]:
    """Per-pair errors (B, C, P): the mean over pixels of (eps_j - eps_theta(x_t_j, t_j, c))^2 (float32; float64 for
    float64 images) for every
    image, class and pair; and the network evaluations per image this took (C * P). `classes`: class indices shared by
    every image (a sequence of C ints) or one row per image (a (B, C) tensor). Gradients flow where autograd is on
    (the caller's no_grad makes it cheap). One forward per timestep and chunk of at most `batch` (image, class) rows
    (None: all B * C rows at once)."""
    B = x0.shape[0]
    classes = torch.as_tensor(classes, dtype=torch.long, device=x0.device)
    if classes.dim() == 1:
        classes = classes.expand(B, -1)
    C = classes.shape[1]
    labels = classes.reshape(-1)  # row b * C + c: image b, its class c
    rows = B * C
    batch = rows if batch is None else max(1, int(batch))
    dtype = torch.promote_types(x0.dtype, torch.float32)  # float64 stays float64 (the mixture's exact checks)
    noises = noises.to(device=x0.device, dtype=dtype)
    errors = []
    for t, eps in zip(timesteps, noises):
        level = denoiser.level(int(t))
        x_t = (level.alpha * x0.to(dtype) + level.noise * eps).repeat_interleave(C, 0)
        per_row = []
        for start in range(0, rows, batch):
            stop = min(start + batch, rows)
            pred = denoiser.predict(x_t[start:stop], level, labels[start:stop]).eps.to(dtype)
            per_row.append((eps - pred).pow(2).flatten(1).mean(1))
        errors.append(torch.cat(per_row).view(B, C))
    if not errors:
        return x0.new_zeros((B, C, 0), dtype=dtype), 0
    return torch.stack(errors, -1), C * len(timesteps)


def class_errors(denoiser, x0: torch.Tensor, classes, timesteps: Sequence[int], noises: torch.Tensor,
                 batch: int | None = None) -> torch.Tensor:
    """(B, C) the mean over the pairs of `pair_errors`: each class's score (lower: more likely)."""
    return pair_errors(denoiser, x0, classes, timesteps, noises, batch)[0].mean(-1)


@dataclass
class Classified:
    """What `classify` found for a batch of images."""

    predictions: torch.Tensor   # (B,) int64: the class of lowest score
    scores: torch.Tensor        # (B, num_classes) mean error over every pair evaluated; +inf for pruned classes
    nfe: int                    # network evaluations per image (every image of a batch costs the same)
    pairs: int                  # pairs the kept class was scored on


def classify(denoiser, x0: torch.Tensor, n_samples: Sequence[int] = (50, 500), to_keep: Sequence[int] = (5, 1),
             seed: int = 0, batch: int | None = None) -> Classified:
    """The adaptive Diffusion Classifier (eval_prob_adaptive.py `eval_prob_adaptive`) on a batch of images x0 in the
    model's coordinates: stage i scores each image's remaining classes on n_samples[i] pairs in total, evaluating only
    the new pairs, and keeps the to_keep[i] best. Non-adaptive: n_samples=[n], to_keep=[1]. Runs under no_grad."""
    T = require_discrete(denoiser)
    C = denoiser.num_classes
    check_stages(n_samples, to_keep, C, T)
    plan = stage_plan(T, n_samples)
    noises = fixed_noises(denoiser.sample_shape, sum(len(p) for p in plan), seed)
    B = x0.shape[0]
    sums = torch.zeros(B, C, dtype=torch.float64, device=x0.device)
    remaining = torch.arange(C, device=x0.device).expand(B, -1)
    used, nfe = 0, 0
    with torch.no_grad():
        for timesteps, keep in zip(plan, to_keep):
            errors, cost = pair_errors(denoiser, x0, remaining, timesteps, noises[used:used + len(timesteps)], batch)
            used, nfe = used + len(timesteps), nfe + cost
            sums.scatter_add_(1, remaining, errors.double().sum(-1))
            mean = sums.gather(1, remaining) / used
            best = torch.topk(-mean, k=keep, dim=1).indices
            remaining = remaining.gather(1, best)
    scores = torch.full((B, C), float("inf"), dtype=torch.float64, device=x0.device)
    scores.scatter_(1, remaining, sums.gather(1, remaining) / used)
    return Classified(scores.argmin(1), scores, nfe, used)


class DiffusionClassifier(CleanClassifier):
    """The generator as its own clean-image classifier (guidance=offshelf, universal, gfcg with
    classifier=fmnist_diffusion): logits(x0)_c = -mean_j sum_pixels (eps_j - eps_theta(x_t_j, t_j, c))^2, the log of
    the paper's posterior (Sec. 3) up to a constant, on n_pairs fixed pairs (the official stratified timesteps of
    `--n_samples n_pairs` and noises of `seed`: deterministic, the same for every call).

    `model` is a Denoiser (`${model}` in the config: the generator's own network, a second copy of it); its
    precision follows the model it is attached to. Gradients flow through the network where the guidance takes them.
    nfe: every call of `logits` costs num_classes * n_pairs network evaluations per image (10 * n_pairs on
    Fashion-MNIST), plus as many backward passes where a gradient is taken: far more than the sampler's own 1-2."""

    def __init__(self, model, n_pairs: int = 10, seed: int = 0, batch_size: int | None = None):
        super().__init__()
        if not isinstance(n_pairs, int) or isinstance(n_pairs, bool) or n_pairs < 1:
            raise UserError(f"classifier.n_pairs={n_pairs!r}: use a whole number >= 1")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise UserError(f"classifier.batch_size={batch_size!r}: use a whole number >= 1, or null")
        self.model = model.eval().requires_grad_(False)
        self.num_classes = model.num_classes
        timesteps, noises = pairs(model, n_pairs, seed)
        self.timesteps = timesteps
        self.register_buffer("noises", noises, persistent=False)
        self.batch_size = batch_size

    def attach(self, denoiser) -> "DiffusionClassifier":
        self.model.set_precision(denoiser.autocast_dtype)
        return self.to(denoiser.device)

    def logits(self, x0: torch.Tensor) -> torch.Tensor:
        """In the model's coordinates (no decode: the network judges its own x0)."""
        errors, _ = pair_errors(self.model, x0, range(self.num_classes), self.timesteps, self.noises,
                                self.batch_size)
        pixels = x0[0].numel()
        return -(errors.mean(-1) * pixels).to(x0.dtype)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(self.model.image_shape) != tuple(self.model.sample_shape):
            raise UserError("the Diffusion Classifier of a latent model judges latents, not images")
        return self.logits(images)
