"""Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models"; no official code) and its
LoRA variant ("LoRA-Enhanced Distillation on Guided Diffusion Models", arXiv 2312.06899; no code). Trainers for
`python -m diffguide.train train=NAME`:

- `train_guided_student` (train=fmnist_guided_student, fmnist_guided_student_lora): stage 1. A student with a
  guidance-scale input, initialised from the teacher, learns the teacher's classifier-free-guided prediction
  eps_u + w (eps_c - eps_u) for w ~ U(w_range) (diffguide's w: Meng et al.'s w is this minus one) at timesteps drawn
  uniformly over the teacher's training range, on noisy training images. Meng et al. write the loss on x with a
  weighting w(lambda); on an eps teacher this matches eps, the teacher's own training loss and weighting.
  With `lora` set, the student is the frozen teacher plus LoRA adapters, and the teacher's predictions come from the
  same network with the adapters (and the scale embedding) switched off.
- `train_progressive` (train=fmnist_progressive): stage 2. Rounds that halve the number of DDIM (eta = 0) steps: each
  round's student (initialised from its teacher, the previous round's student; the first teacher the stage-1
  student) learns to take in one step what its teacher takes in two (Salimans & Ho 2022, Algorithm 2, the target in
  x0 form, as Meng et al. use it), at w ~ U(w_range). Every round's student is written.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from diffguide.store import checkpoint
from diffguide.errors import UserError
from diffguide.guidance.base import GuidedPrediction
from diffguide.models import student as student_lib
from diffguide.models import unet as unet_lib
from diffguide.models.schedules import CLEAN, Level
from diffguide.runtime.device import resolve_precision
from diffguide.samplers.ddim import DDIM
from diffguide.training.loop import ema_of, noised, train_loop
from diffguide.data.fashion_mnist import to_model_range


def guided_target(teacher, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The teacher's classifier-free-guided network output eps_u + w (eps_c - eps_u) per row (Meng et al., eq. 1 in
    their convention (1 + w') eps_c - w' eps_u with w' = w - 1), the conditional and unconditional predictions in one
    batched forward, without gradients."""
    null = torch.full_like(labels, teacher.null_class)
    with torch.no_grad():
        out = teacher.raw_output(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null, labels])).float()
    uncond, cond = out.chunk(2)
    w = w.float().view(-1, *([1] * (x_t.dim() - 1)))
    return uncond + w * (cond - uncond)


def two_step_target(predict, x_t: torch.Tensor, t: Level, t_mid: Level, t_next: Level,
                    data_range: tuple[float, float] | None) -> torch.Tensor:
    """The x0 target of progressive distillation (Salimans & Ho 2022, Algorithm 2): two deterministic DDIM steps of
    the teacher, t -> t_mid -> t_next (each the project's DDIM step, x0 clipped to `data_range` as the sampler does),
    then the x~ whose one DDIM step from x_t lands where they did:

        x~ = (x_t'' - (sigma_t'' / sigma_t) x_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

    (Algorithm 2's line; at t'' = the clean data it is x_t'' itself). `predict(x, level)` is the teacher's
    Prediction. With `data_range` the target is clipped to it too: a clipping sampler's step from x_t lands at
    alpha'' clip(x^) + sigma'' (x_t - alpha_t clip(x^)) / sigma_t, which is monotone in each pixel of x^, so clip(x~)
    is the student prediction whose step comes closest to the teacher's two."""
    sampler = DDIM(2, eta=0.0, clip_x0=data_range is not None)
    holder = SimpleNamespace(data_range=data_range, level=lambda level: level)  # what DDIM reads of a denoiser
    x = x_t
    for level, lower in ((t, t_mid), (t_mid, t_next)):
        pred = sampler._finalize(holder, x, level, lower, GuidedPrediction.of(predict(x, level), nfe=1))
        x = sampler.step(holder, x, level, lower, pred, noise=None)
    ratio = t_next.noise / t.noise
    target = (x - ratio * x_t) / (t_next.alpha - ratio * t.alpha)
    return target if data_range is None else target.clamp(*data_range)


def train_guided_student(cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                         test=None, log=print):
    """Stage 1 (see the module's docstring). Returns the (EMA) student and its training stats."""
    torch.manual_seed(cfg.seed)
    teacher_file = str(cfg.teacher)
    teacher = unet_lib.load(teacher_file)
    student = student_lib.from_teacher(teacher, list(cfg.w_range))
    lora = cfg.get("lora")
    if lora:
        del teacher
        student_lib.add_lora(student, int(lora.r), float(lora.alpha), list(lora.target_modules))
        student.teacher = {"file": Path(teacher_file).name, "sha256": checkpoint.file_digest(teacher_file, 64)}
        teacher = student_lib.LoraBase(student)
    else:
        student.unet.requires_grad_(True)
    teacher.to(device).set_precision(resolve_precision(cfg.precision))
    student.to(device).train()
    student.set_precision(resolve_precision(cfg.precision))
    trainable = {k: p for k, p in student.unet.named_parameters() if p.requires_grad}
    ema = ema_of(trainable, cfg.ema_decay)
    x_all = to_model_range(images)
    lo, hi = (float(v) for v in cfg.w_range)

    def batch_loss(generator):
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=generator)
        t = torch.randint(0, student.num_train_timesteps, (cfg.batch_size,), generator=generator).to(device)
        noise = torch.randn((cfg.batch_size, *x_all.shape[1:]), generator=generator).to(device)
        w = (lo + (hi - lo) * torch.rand(cfg.batch_size, generator=generator)).to(device)
        y = labels[idx].to(device)
        x_t = noised(student.alphas_cumprod, x_all[idx].to(device), t, noise)
        target = guided_target(teacher, x_t, t, y, w)
        return F.mse_loss(student.guided_output(x_t, t, y, w).float(), target)

    card = {"teacher_file": Path(teacher_file).name, "w_range": [lo, hi], **student_lib.parameter_counts(student)}
    stats = train_loop(cfg, trainable.values(), batch_loss, device, log, clip_grad_norm=1.0, after_step=ema.update,
                       keep=ema.shadow)
    stats.update(card)
    ema.swap()  # the EMA student (not the live one) is written and returned
    student_lib.save(student, Path(cfg.out), extra={"training": stats})
    return student.eval(), stats


WEIGHTINGS = ("snr", "truncated_snr")


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise UserError(f"train.weighting={weighting!r} is not one of {', '.join(WEIGHTINGS)}")


def progressive_loss(teacher: student_lib.GuidedStudent, student: student_lib.GuidedStudent, x_t: torch.Tensor,
                     labels: torch.Tensor, w: torch.Tensor, t: Level, t_mid: Level, t_next: Level,
                     weighting: str = "snr") -> torch.Tensor:
    """The loss of one batch at one student step t -> t_next against `two_step_target` x~ of the teacher at the same
    w, x^ = (x_t - sigma_t eps^) / alpha_t the student's x0:

    - "truncated_snr": Salimans & Ho's max(alpha_t^2 / sigma_t^2, 1) |x^ - x~|^2 (their truncated-SNR weighting);
    - "snr" (default): alpha_t^2 / sigma_t^2 |x^ - x~|^2, i.e. |eps^ - eps~|^2 with eps~ the eps consistent with x~
      at x_t: the eps-prediction student's own loss. Salimans & Ho weight the x0 error by at least 1 because their
      students predict x or v; an eps student's x0 error at the first level (t = 999, alpha 0.0063) is its eps
      error times sigma / alpha = 157, so bf16's rounding of the output alone makes an x0 error of about 1 there
      (measured: the truncated-SNR loss swung between 0.04 and 4 from batch to batch), while the step it takes moves x by that error times
      alpha_next - sigma_next alpha_t / sigma_t (0.05 at 4 steps), and the sampler clips x0."""
    _check_weighting(weighting)
    with torch.no_grad():
        target = two_step_target(lambda x, level: teacher.predict_guided(x, level, labels, w), x_t, t, t_mid, t_next,
                                 teacher.data_range)
    time = torch.full((x_t.shape[0],), t.t, device=x_t.device, dtype=torch.long)
    eps = student.guided_output(x_t, time, labels, w).float()
    if weighting == "snr":
        return F.mse_loss(eps, (x_t - t.alpha * target) / t.noise)
    x0 = (x_t - t.noise * eps) / t.alpha
    return max(t.alpha ** 2 / t.noise ** 2, 1.0) * F.mse_loss(x0, target)


def round_levels(model, steps: int) -> tuple[list[Level], list[Level]]:
    """(student levels, teacher levels) of a round distilling 2 * steps DDIM steps into `steps`: the student's
    trailing grid must be every other level of the teacher's (true on the 1000-step schedule for every step count
    up to 47; 48 is the first where rounding breaks it)."""
    student_levels = model.schedule.grid(DDIM.scheduler_class, steps, "trailing")
    teacher_levels = model.schedule.grid(DDIM.scheduler_class, 2 * steps, "trailing")
    if teacher_levels[::2] != student_levels:
        raise UserError(f"the {steps}-step DDIM grid is not every other level of the {2 * steps}-step one: choose "
                        f"other round step counts")
    return student_levels, teacher_levels


def out_path(prefix: str, steps: int) -> str:
    """The file of a round's student: PREFIX_<steps>step.safetensors."""
    return f"{prefix}_{steps}step.safetensors"


def train_progressive(cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                      test=None, log=print):
    """Stage 2 (see the module's docstring): cfg.rounds lists the students' step counts, each half the one before
    (the first teacher, cfg.student, runs 2 x rounds[0] steps); cfg.steps training steps per round; every round's
    student is written to `out_path(cfg.out, steps)` (its card by `python -m diffguide.train`). Returns the last
    student and every round's stats."""
    rounds = [int(r) for r in cfg.rounds]
    _check_weighting(cfg.get("weighting", "snr"))
    if not rounds or any(b * 2 != a for a, b in zip(rounds, rounds[1:])) or rounds[-1] < 1:
        raise UserError(f"train.rounds must halve from one round to the next, e.g. [16, 8, 4] (got {rounds})")
    teacher = student_lib.load(str(cfg.student)).to(device)
    teacher.set_precision(resolve_precision(cfg.precision))
    x_all = to_model_range(images)
    lo, hi = (float(v) for v in cfg.w_range)
    if not (teacher.w_range[0] <= lo <= hi <= teacher.w_range[1]):
        raise UserError(f"train.w_range {[lo, hi]} must lie within the stage-1 student's {list(teacher.w_range)}")
    all_stats = {}
    for steps in rounds:
        student_levels, teacher_levels = round_levels(teacher, steps)
        student = student_lib.copy_student(teacher, trained_steps=steps).to(device).train().requires_grad_(True)
        student.set_precision(resolve_precision(cfg.precision))
        trainable = dict(student.unet.named_parameters())
        ema = ema_of(trainable, cfg.ema_decay)

        def batch_loss(generator, student=student, student_levels=student_levels, teacher_levels=teacher_levels,
                       teacher=teacher):
            i = int(torch.randint(0, len(student_levels), (1,), generator=generator))
            t, t_mid = teacher_levels[2 * i], teacher_levels[2 * i + 1]
            t_next = teacher_levels[2 * i + 2] if 2 * i + 2 < len(teacher_levels) else CLEAN
            idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=generator)
            noise = torch.randn((cfg.batch_size, *x_all.shape[1:]), generator=generator)
            w = (lo + (hi - lo) * torch.rand(cfg.batch_size, generator=generator)).to(device)
            x_t = (t.alpha * x_all[idx] + t.noise * noise).to(device)
            return progressive_loss(teacher, student, x_t, labels[idx].to(device), w, t, t_mid, t_next,
                                    cfg.get("weighting", "snr"))

        out = out_path(str(cfg.out), steps)
        card = {"teacher_steps": 2 * steps, "student_steps": steps, "w_range": [lo, hi],
                "teacher_file": Path(str(cfg.student)).name if steps == rounds[0]
                else Path(out_path(str(cfg.out), 2 * steps)).name}
        log(f"round: {2 * steps} -> {steps} DDIM steps")
        stats = train_loop(cfg, trainable.values(), batch_loss, device, log, clip_grad_norm=1.0,
                           after_step=ema.update, keep=ema.shadow)
        stats.update(card)
        ema.swap()  # the EMA student is this round's result and the next round's teacher
        student_lib.save(student, Path(out), extra={"training": stats})
        log(f"wrote {out}")
        all_stats[f"{steps}step"] = stats
        log(json.dumps(stats))
        teacher = student.eval().requires_grad_(False)
    return teacher, all_stats
