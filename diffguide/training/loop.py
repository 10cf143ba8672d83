"""The loop every trainer shares (AdamW under a warm-up + cosine schedule, logged losses, periodic checkpoints),
the EMA of a network's parameters, DDPM's forward process, and the model card written beside trained weights."""

import json
import math
import platform
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffguide.store import checkpoint


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


def ema_of(parameters: dict[str, torch.nn.Parameter], decay: float):
    """An exponential moving average of `parameters`, with a warm-up so that a short run still averages over its own
    steps only (decay min(decay, (1 + step) / (10 + step))). Returns (update, swap): `update(step)` after each
    optimiser step; `swap()` exchanges the live and the averaged values (call it again to restore)."""
    shadow = {k: p.detach().clone() for k, p in parameters.items()}

    def update(step):
        d = min(decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in parameters.items():
                shadow[k].lerp_(p, 1 - d)

    def swap():
        with torch.no_grad():
            for k, p in parameters.items():
                live = p.detach().clone()
                p.copy_(shadow[k])
                shadow[k] = live

    return update, swap


def noised(alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise per row, a_t = alphas_cumprod[t] (the forward process of DDPM)."""
    a = alphas_cumprod[t].float().view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _stats(losses: list[float], steps: int, wall: float, device: torch.device, parameters) -> dict:
    tail = losses[-min(len(losses), 100):]
    return {"steps": steps, "final_loss": sum(tail) / len(tail), "first_loss": losses[0], "wall_time_s": round(wall, 1),
            "hardware": hardware(device), "parameters": sum(p.numel() for p in parameters)}


def train_loop(cfg: DictConfig, parameters, batch_loss, device: torch.device, log=print, *,
                clip_grad_norm: float | None = None, after_step=None, save_checkpoint=None,
                checkpoint_every: int = 0) -> dict:
    """The loop every trainer shares: cfg.steps AdamW steps (cfg.lr, cfg.weight_decay) on `parameters` under the
    warm-up + cosine schedule `_lr`, the loss of each step `batch_loss(generator)` (the generator seeded from cfg.seed
    draws the batches), the mean loss logged every cfg.log_every steps. The differences between recipes are the
    arguments: `clip_grad_norm` clips the gradients' norm before the step, `after_step(step)` runs after it (an EMA
    update), `save_checkpoint(stats)` every `checkpoint_every` steps but the last. Returns the training stats."""
    parameters = list(parameters)
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses, start = [], time.time()
    for step in range(cfg.steps):
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
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
            log(f"step {step + 1}/{cfg.steps} loss {recent:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{time.time() - start:.0f}s")
        if save_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(_stats(losses, step + 1, time.time() - start, device, parameters))
    return _stats(losses, cfg.steps, time.time() - start, device, parameters)


def write_card(cfg: DictConfig, stats: dict) -> Path:
    """A model card beside the weights: what was trained, how, on what, and how it ended."""
    out = Path(cfg.out)
    card = out.with_suffix(".md")
    lines = [f"# {out.name}", "", f"Trained by `python -m diffguide.train train={cfg.name}` "
             f"({time.strftime('%Y-%m-%d')}).", "", "## Training config", "```yaml",
             OmegaConf.to_yaml(cfg).rstrip(), "```", "", "## Result", "```json", json.dumps(stats, indent=2), "```", ""]
    checkpoint.atomic_write_text(card, "\n".join(lines))
    return card
