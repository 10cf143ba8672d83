"""Train the embedded Fashion-MNIST networks: `python -m diffguide.train train=NAME` runs the trainer that
conf/train/NAME.yaml names by `_target_` (train_unet, train_dit, train_evaluator, train_noisy_classifier, the
distillation trainers)."""

import inspect
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from diffguide import checkpoint
from diffguide.classifiers import noisy as noisy_lib
from diffguide.config import CONF_DIR, register
from diffguide.data import fashion_mnist
from diffguide.errors import UserError
from diffguide.models import dit as dit_lib
from diffguide.models import unet as unet_lib
from diffguide.networks import evaluator as evaluator_lib
from diffguide.runtime import resolve_device, resolve_precision


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} CPU threads"


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def diffusion_loss(model: unet_lib.UNetDenoiser, x0: torch.Tensor, labels: torch.Tensor, label_dropout: float,
                   generator: torch.Generator) -> torch.Tensor:
    """The DDPM eps-prediction loss, with labels dropped to the null class at rate `label_dropout` (for CFG)."""
    batch = x0.shape[0]
    t = torch.randint(0, model.num_train_timesteps, (batch,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = noised(model.alphas_cumprod, x0, t, noise)
    drop = torch.rand(batch, generator=generator).to(x0.device) < label_dropout
    labels = torch.where(drop, torch.full_like(labels, model.null_class), labels)
    return F.mse_loss(model.network_output(x_t, t, labels).float(), noise)


def flow_loss(model: unet_lib.UNetDenoiser, x0: torch.Tensor, labels: torch.Tensor, label_dropout: float,
              generator: torch.Generator) -> torch.Tensor:
    """The flow-matching (rectified flow) velocity loss: x_tau = (1 - tau) x0 + tau eps with tau ~ U(0, 1), target
    v = eps - x0, the network's timestep input 1000 tau (the convention of diffusers' FlowMatchEulerDiscreteScheduler:
    timestep = sigma * num_train_timesteps); labels dropped to the null class as in `diffusion_loss`."""
    batch = x0.shape[0]
    tau = torch.rand(batch, generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    tau_b = tau.view(-1, 1, 1, 1)
    x_t = (1 - tau_b) * x0 + tau_b * noise
    drop = torch.rand(batch, generator=generator).to(x0.device) < label_dropout
    labels = torch.where(drop, torch.full_like(labels, model.null_class), labels)
    return F.mse_loss(model.network_output(x_t, tau, labels).float(), noise - x0)


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
            "hardware": _hardware(device), "parameters": sum(p.numel() for p in parameters)}


def _train_loop(cfg: DictConfig, parameters, batch_loss, device: torch.device, log=print, *,
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


def train_unet(cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
               test: tuple[torch.Tensor, torch.Tensor] | None = None, log=print,
               model: unet_lib.UNetDenoiser | None = None) -> tuple[unet_lib.UNetDenoiser, dict]:
    """Train (from `model`, or from a fresh network built from cfg.unet); returns the EMA model and its stats.
    `test` is accepted for the trainers' common signature and not used."""
    torch.manual_seed(cfg.seed)
    if model is None:
        model = unet_lib.build(OmegaConf.to_container(cfg.unet), cfg.num_classes,
                               OmegaConf.to_container(cfg.scheduler), cfg.get("parameterisation", "eps"))
    return _train_denoiser(cfg, model, model.unet, unet_lib.save, images, labels, device, log)


def train_dit(cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              test: tuple[torch.Tensor, torch.Tensor] | None = None, log=print,
              model: dit_lib.PixelDiT | None = None) -> tuple[dit_lib.PixelDiT, dict]:
    """Train a pixel DiT (cfg.dit: DiTTransformer2DModel's arguments) with the UNet's recipe (the eps loss with
    label dropout, warm-up + cosine AdamW, EMA, gradient clipping); returns the EMA model and its stats."""
    torch.manual_seed(cfg.seed)
    if model is None:
        model = dit_lib.build(OmegaConf.to_container(cfg.dit), cfg.num_classes, OmegaConf.to_container(cfg.scheduler))
    return _train_denoiser(cfg, model, model.transformer, dit_lib.save, images, labels, device, log)


def _train_denoiser(cfg: DictConfig, model, network: torch.nn.Module, save_model, images: torch.Tensor,
                    labels: torch.Tensor, device: torch.device, log) -> tuple:
    """The denoisers' recipe: `network` (the model's trainable module) trained on the eps (or flow) loss, its EMA
    written by `save_model(model, path, extra)` every cfg.checkpoint_every steps and at the end."""
    model = model.to(device).train().requires_grad_(True)
    model.set_precision(resolve_precision(cfg.precision))
    x_all = to_model_range(images)
    loss_fn = flow_loss if cfg.get("parameterisation", "eps") == "flow" else diffusion_loss

    def batch_loss(generator):
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=generator)
        return loss_fn(model, x_all[idx].to(device), labels[idx].to(device), cfg.label_dropout, generator)

    update_ema, swap_ema = ema_of(dict(network.named_parameters()), cfg.ema_decay)

    def save(stats):
        """Write the EMA network (not the live one) to cfg.out."""
        swap_ema()
        try:
            save_model(model, Path(cfg.out), extra={"training": stats})
        finally:
            swap_ema()

    stats = _train_loop(cfg, network.parameters(), batch_loss, device, log, clip_grad_norm=1.0,
                        after_step=update_ema, save_checkpoint=save, checkpoint_every=cfg.checkpoint_every)
    save(stats)
    swap_ema()  # the returned model is the EMA one
    return model, stats


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels. No flips: Fashion-MNIST's shoes all face one way, and the evaluator's
    features should see it when generated ones do not."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2, n), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28] for i in range(n)])


@torch.no_grad()
def accuracy(model: evaluator_lib.Evaluator, images: torch.Tensor, labels: torch.Tensor, device) -> float:
    correct = 0
    for i in range(0, len(images), 1000):
        correct += (model(images[i:i + 1000].to(device)).argmax(1).cpu() == labels[i:i + 1000]).sum().item()
    return correct / len(images)


def _train_classifier(cfg: DictConfig, model: torch.nn.Module, device: torch.device, draw_batch, forward,
                      log=print) -> dict:
    """Cross-entropy training of either classifier in the shared loop: `draw_batch(generator)` gives (inputs, labels)
    on the CPU, `forward(*inputs)` the logits (under autocast in cfg.precision). Returns the training stats."""
    dtype = resolve_precision(cfg.precision)

    def batch_loss(generator):
        inputs, targets = draw_batch(generator)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = forward(*(x.to(device) for x in inputs))
        return F.cross_entropy(logits.float(), targets.to(device))

    model.train()
    stats = _train_loop(cfg, model.parameters(), batch_loss, device, log)
    model.eval()
    return stats


def train_evaluator(cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                    test: tuple[torch.Tensor, torch.Tensor] | None = None, log=print):
    torch.manual_seed(cfg.seed)
    timm_kwargs = OmegaConf.to_container(cfg.timm_kwargs) if cfg.get("timm_kwargs") else None
    model = evaluator_lib.Evaluator(cfg.timm_model, cfg.num_classes, timm_kwargs=timm_kwargs).to(device)
    x_all = images.float() / 255

    def draw_batch(generator):
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=generator)
        return (_augment(x_all[idx], generator),), labels[idx]

    stats = _train_classifier(cfg, model, device, draw_batch, model, log)
    if test is not None:
        stats["test_accuracy"] = accuracy(model, *test, device)
    evaluator_lib.save(model, Path(cfg.out), extra={"training": stats})
    return model, stats


def train_noisy_classifier(cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                           test: tuple[torch.Tensor, torch.Tensor] | None = None, log=print):
    """p(y | x_t, t) on the forward process of the model it will guide (the same noise schedule)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(cfg.seed)
    alphas = DDPMScheduler.from_config(OmegaConf.to_container(cfg.scheduler)).alphas_cumprod.float()
    model = noisy_lib.NoisyClassifier(images.shape[1], list(cfg.channels), cfg.num_classes).to(device)

    def noisy(x0, t, noise):
        return noised(alphas, x0, t, noise)

    x_all = to_model_range(images)

    def draw_batch(generator):
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=generator)
        t = torch.randint(0, len(alphas), (cfg.batch_size,), generator=generator)
        return (noisy(x_all[idx], t, torch.randn(x_all[idx].shape, generator=generator)), t), labels[idx]

    stats = _train_classifier(cfg, model, device, draw_batch, model.logits, log)
    if test is not None:
        test_x0, test_labels = to_model_range(test[0]), test[1]
        noise = torch.randn(test_x0.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t_eval in (0, 250, 500, 750, 999):
                t_batch = torch.full((len(test_x0),), t_eval)
                predicted = torch.cat([model.logits(noisy(test_x0[i:i + 1000], t_batch[i:i + 1000],
                                                          noise[i:i + 1000]).to(device),
                                                    t_batch[i:i + 1000].to(device)).argmax(1).cpu()
                                       for i in range(0, len(test_x0), 1000)])
                stats[f"test_accuracy_t{t_eval}"] = (predicted == test_labels).double().mean().item()
    noisy_lib.save(model, Path(cfg.out), extra={"training": stats, "scheduler": OmegaConf.to_container(cfg.scheduler)})
    return model, stats


def write_card(cfg: DictConfig, stats: dict) -> Path:
    """A model card beside the weights: what was trained, how, on what, and how it ended."""
    out = Path(cfg.out)
    card = out.with_suffix(".md")
    lines = [f"# {out.name}", "", f"Trained by `python -m diffguide.train train={cfg.name}` "
             f"({time.strftime('%Y-%m-%d')}).", "", "## Training config", "```yaml",
             OmegaConf.to_yaml(cfg).rstrip(), "```", "", "## Result", "```json", json.dumps(stats, indent=2), "```", ""]
    checkpoint.atomic_write_text(card, "\n".join(lines))
    return card


def resolve_trainer(tcfg: DictConfig):
    """The function train._target_ names; a missing one, one that cannot be imported or one that does not take a
    trainer's arguments (cfg, images, labels, device, test=, log=) is a UserError."""
    target = tcfg.get("_target_")
    if not target:
        raise UserError("train._target_ is missing: name the trainer, e.g. train._target_=diffguide.train.train_unet")
    hydra_log = logging.getLogger("hydra.utils")  # get_method logs a failure over lines: the UserError is one line
    disabled, hydra_log.disabled = hydra_log.disabled, True
    try:
        trainer = get_method(str(target))
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"train._target_={target} cannot be imported: name a trainer such as "
                        f"diffguide.train.train_unet, train_evaluator or train_noisy_classifier") from None
    finally:
        hydra_log.disabled = disabled
    try:
        inspect.signature(trainer).bind(tcfg, None, None, None, test=None, log=print)
    except (TypeError, ValueError):
        raise UserError(f"train._target_={target} is not a trainer: a trainer takes "
                        f"(cfg, images, labels, device, test=None, log=print)") from None
    return trainer


register()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        tcfg = cfg.train
        trainer = resolve_trainer(tcfg)
        device = resolve_device(cfg.device)
        resolve_precision(tcfg.precision)
        if tcfg.steps < 1 or tcfg.batch_size < 1:
            raise UserError(f"train.steps and train.batch_size must be >= 1 (got {tcfg.steps}, {tcfg.batch_size})")
        images, labels = fashion_mnist.load("train")
        test = fashion_mnist.load("test")
    except UserError as exc:
        print(f"diffguide: error: {exc}", file=sys.stderr)
        sys.exit(2)
    _, stats = trainer(tcfg, images, labels, device, test=test)
    print(json.dumps(stats))
    if "rounds" not in tcfg:  # progressive distillation writes every round's file and card itself
        print(f"wrote {tcfg.out} and {write_card(tcfg, stats)}")


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
    main()
