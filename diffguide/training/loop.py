"""The loop every trainer shares (AdamW under a warm-up + cosine schedule, logged losses, resumable state),
the EMA of a network's parameters, DDPM's forward process, and the model card written beside trained weights."""

import json
import math
import platform
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffguide.errors import UserError
from diffguide.store import checkpoint
from diffguide.training import resume


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} CPU threads"


class EMA:
    """An exponential moving average of `parameters`, with a warm-up so that a short run still averages over its own
    steps only (decay min(decay, (1 + step) / (10 + step))). `update(step)` after each optimiser step; `swap()`
    exchanges the live and the averaged values in place (call it again to restore); `shadow`: the averages, which a
    resumable loop keeps (`train_loop(keep=...)`). Unpacks as (update, swap)."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float):
        self.parameters, self.decay = parameters, decay
        self.shadow = {k: p.detach().clone() for k, p in parameters.items()}

    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in self.parameters.items():
                self.shadow[k].lerp_(p, 1 - d)

    def swap(self) -> None:
        with torch.no_grad():
            for k, p in self.parameters.items():
                live = p.detach().clone()
                p.copy_(self.shadow[k])
                self.shadow[k].copy_(live)

    def __iter__(self):
        return iter((self.update, self.swap))


def ema_of(parameters: dict[str, torch.nn.Parameter], decay: float) -> EMA:
    return EMA(parameters, decay)


def noised(alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise per row, a_t = alphas_cumprod[t] (the forward process of DDPM)."""
    a = alphas_cumprod[t].float().view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _stats(losses: list[float], steps: int, wall: float, device: torch.device, parameters) -> dict:
    tail = losses[-min(len(losses), 100):]
    return {"steps": steps, "final_loss": sum(tail) / len(tail), "first_loss": losses[0], "wall_time_s": round(wall, 1),
            "hardware": hardware(device), "parameters": sum(p.numel() for p in parameters)}


def train_loop(cfg: DictConfig, parameters, batch_loss, device: torch.device, log=print, *,
                clip_grad_norm: float | None = None, after_step=None, keep: dict[str, torch.Tensor] | None = None
                ) -> dict:
    """The loop every trainer shares: cfg.steps AdamW steps (cfg.lr, cfg.weight_decay) on `parameters` under the
    warm-up + cosine schedule `_lr`, the loss of each step `batch_loss(generator)` (the generator seeded from cfg.seed
    draws the batches), the mean loss logged every cfg.log_every steps. The differences between recipes are the
    arguments: `clip_grad_norm` clips the gradients' norm before the step, `after_step(step)` runs after it (an EMA
    update). Under a command's `resume.TrainingState` the loop saves its whole state (with the tensors `keep`
    names, e.g. the EMA's) every few steps, at a Ctrl-C and at its end, and resumes from it. Returns the stats."""
    parameters = list(parameters)
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    keep = keep or {}
    losses, elapsed, first = [], 0.0, 0
    saver = resume.current()
    path = saver.next_path() if saver is not None else None
    state = saver.load(path) if saver is not None else None
    if state is not None:
        shapes = [tuple(p.shape) for p in parameters]
        if [tuple(v.shape) for v in state["parameters"]] != shapes or int(state["total"]) != cfg.steps \
                or sorted(state["keep"]) != sorted(keep):
            raise UserError(f"the training state {path} is not this training's (other shapes or step count); "
                            f"delete it, or use another out_dir")
        with torch.no_grad():
            for p, v in zip(parameters, state["parameters"]):
                p.copy_(v)
            for k, v in state["keep"].items():
                keep[k].copy_(v)
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        resume.set_rng_state(state["rng"])
        losses, elapsed, first = state["losses"].tolist(), float(state["elapsed"]), int(state["step"])
        saver.last = (first, cfg.steps, path)
        log(f"resumed at step {first}/{cfg.steps} from {path}" if first < cfg.steps else
            f"restored the finished loop from {path}")

    def snapshot(step: int) -> dict:
        return {"step": step, "total": cfg.steps, "parameters": [p.detach().cpu().clone() for p in parameters],
                "keep": {k: v.detach().cpu().clone() for k, v in keep.items()}, "optimizer": opt.state_dict(),
                "generator": generator.get_state(), "rng": resume.rng_state(),
                "losses": torch.tensor(losses, dtype=torch.float64), "elapsed": time.time() - start}

    start = time.time() - elapsed
    with resume.deferred_interrupt() as stop:
        for step in range(first, cfg.steps):
            for group in opt.param_groups:
                group["lr"] = _lr(step, cfg.steps, cfg.lr, cfg.warmup_steps)
            loss = batch_loss(generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
            opt.step()
            if after_step is not None:
                after_step(step)
            losses.append(loss.item())
            done = step + 1
            if saver is not None and (stop.set or done == cfg.steps or (saver.every and done % saver.every == 0)):
                saver.save(path, snapshot(done))  # before the step's line: a kill after it finds this state
            if done % cfg.log_every == 0 or done == cfg.steps:
                recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
                log(f"step {done}/{cfg.steps} loss {recent:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                    f"{time.time() - start:.0f}s")
            if stop.set:  # (also a Ctrl-C that came while the line above was written)
                if saver is None:
                    raise KeyboardInterrupt
                if saver.last != (done, cfg.steps, path):
                    saver.save(path, snapshot(done))
                raise saver.interrupted()
    return _stats(losses, cfg.steps, time.time() - start, device, parameters)


def write_card(cfg: DictConfig, stats: dict, weights: Path | None = None) -> Path:
    """A model card beside the weights (`weights`, by default cfg.out): what was trained, how, on what, and how it
    ended."""
    out = Path(cfg.out if weights is None else weights)
    card = out.with_suffix(".md")
    lines = [f"# {out.name}", "", f"Trained by `python -m diffguide.train train={cfg.name}` "
             f"({time.strftime('%Y-%m-%d')}).", "", "## Training config", "```yaml",
             OmegaConf.to_yaml(cfg).rstrip(), "```", "", "## Result", "```json", json.dumps(stats, indent=2), "```", ""]
    checkpoint.atomic_write_text(card, "\n".join(lines))
    return card
