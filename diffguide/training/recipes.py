"""The recipes of the embedded networks: the denoisers (UNet, pixel DiT; eps or flow loss, label dropout, EMA) and
the classifiers (the evaluator, the noise-aware classifier), each a trainer `conf/train/NAME.yaml` names by
`_target_` (cfg, images, labels, device, test=None, log=print) -> (model, stats)."""

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from diffguide.classifiers import evaluator as evaluator_lib
from diffguide.classifiers import noisy as noisy_lib
from diffguide.data.fashion_mnist import to_model_range
from diffguide.models import dit as dit_lib
from diffguide.models import unet as unet_lib
from diffguide.runtime.device import resolve_precision
from diffguide.training.loop import ema_of, noised, train_loop


def diffusion_loss(model: unet_lib.UNetDenoiser, x0: torch.Tensor, labels: torch.Tensor, label_dropout: float,
                   generator: torch.Generator) -> torch.Tensor:
    """The DDPM eps-prediction loss, with labels dropped to the null class at rate `label_dropout` (for CFG)."""
    batch = x0.shape[0]
    t = torch.randint(0, model.num_train_timesteps, (batch,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = noised(model.alphas_cumprod, x0, t, noise)
    drop = torch.rand(batch, generator=generator).to(x0.device) < label_dropout
    labels = torch.where(drop, torch.full_like(labels, model.null_class), labels)
    return F.mse_loss(model.raw_output(x_t, t, labels).float(), noise)


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
    return F.mse_loss(model.raw_output(x_t, tau, labels).float(), noise - x0)


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
    written by `save_model(model, path, extra)` at the end."""
    model = model.to(device).train().requires_grad_(True)
    model.set_precision(resolve_precision(cfg.precision))
    x_all = to_model_range(images)
    loss_fn = flow_loss if cfg.get("parameterisation", "eps") == "flow" else diffusion_loss

    def batch_loss(generator):
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=generator)
        return loss_fn(model, x_all[idx].to(device), labels[idx].to(device), cfg.label_dropout, generator)

    ema = ema_of(dict(network.named_parameters()), cfg.ema_decay)
    stats = train_loop(cfg, network.parameters(), batch_loss, device, log, clip_grad_norm=1.0,
                       after_step=ema.update, keep=ema.shadow)
    ema.swap()  # the EMA network (not the live one) is written to cfg.out and returned
    save_model(model, Path(cfg.out), extra={"training": stats})
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
    stats = train_loop(cfg, model.parameters(), batch_loss, device, log)
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
