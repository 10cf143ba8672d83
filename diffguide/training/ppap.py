"""PPAP's expert training (Go et al. 2023, "Towards Practical Plug-and-Play Diffusion Models"), the trainer of
`python -m diffguide.train train=fmnist_ppap`:

1. the diffusion model generates `num_generated` images unconditionally (the null class; DDIM, `gen_steps` steps):
   the transfer set, with no labels (the paper's data-free knowledge transfer);
2. the clean off-the-shelf classifier labels them softly: q = softmax(f(x0) / temperature);
3. each expert k, initialised from the clean classifier (LoRA factors at B = 0: the clean classifier exactly), learns
   on x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with t uniform in its range [b_k, b_{k+1}) to match q:
   loss = sum_y q(y) (log q(y) - log p_k(y | x_t)) (KL(q || p_k); the paper's knowledge-transfer loss, the
   clean classifier's output on the clean image as the target of the expert's on the noisy one).
"""

import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from diffguide.store.atomic import atomic_write_bytes
from diffguide.classifiers import ppap as ppap_lib
from diffguide.classifiers.clean import _relu_to_softplus
from diffguide.errors import UserError
from diffguide.guidance.none import NoGuidance
from diffguide.classifiers import evaluator as evaluator_lib
from diffguide.runtime.device import resolve_precision
from diffguide.samplers.ddim import DDIM
from diffguide.training.loop import hardware, noised, train_loop
from diffguide.data.fashion_mnist import to_model_range


@torch.no_grad()
def generate_transfer_set(denoiser, count: int, steps: int, batch_size: int, seed: int, device,
                          log=print) -> torch.Tensor:
    """`count` unconditional samples of the model (DDIM, eta 0, x0 clipped), in the model's coordinates, on the CPU;
    sample i starts from the noise of seed + i."""
    sampler, guidance = DDIM(steps), NoGuidance(conditional=False)
    out, start = [], time.time()
    for first in range(0, count, batch_size):
        n = min(batch_size, count - first)
        x_T = torch.stack([torch.randn(denoiser.sample_shape, generator=torch.Generator().manual_seed(seed + first + i))
                           for i in range(n)]).to(device)
        labels = torch.zeros(n, dtype=torch.long, device=device)
        x0, _ = sampler.sample(denoiser, guidance, x_T, labels)
        out.append(x0.float().cpu())
        log(f"generated {first + n}/{count} {time.time() - start:.0f}s")
    return torch.cat(out)


def soft_targets(teacher: evaluator_lib.Evaluator, x0: torch.Tensor, temperature: float, batch: int = 1000,
                 device=None) -> torch.Tensor:
    """q(y | x0) = softmax(f(x0) / T) of the clean classifier on the clean images (model coordinates -> [0, 1],
    clipped), float32 on the CPU."""
    rows = []
    with torch.no_grad():
        for i in range(0, len(x0), batch):
            images = ((x0[i:i + batch] + 1) / 2).clamp(0, 1).to(device)
            rows.append(torch.softmax(teacher(images).float() / temperature, dim=1).cpu())
    return torch.cat(rows)


def transfer_loss(log_p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(q || p) averaged over the batch: sum_y q (log q - log p), with 0 log 0 = 0."""
    return (torch.xlogy(q, q) - q * log_p).sum(1).mean()


def noisy_accuracy(experts: ppap_lib.PPAPExperts, images: torch.Tensor, labels: torch.Tensor,
                   alphas: torch.Tensor, timesteps, device, seed: int = 0) -> dict:
    """Each expert's routed accuracy on test images noised to each timestep (one fixed noise draw)."""
    x0 = to_model_range(images)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    result = {}
    with torch.no_grad():
        for t in timesteps:
            x_t = noised(alphas, x0, torch.full((len(x0),), t), noise)
            predicted = torch.cat([experts.log_prob(x_t[i:i + 1000].to(device), t).argmax(1).cpu()
                                   for i in range(0, len(x_t), 1000)])
            result[f"test_accuracy_t{t}"] = round((predicted == labels).double().mean().item(), 4)
    return result


def train_ppap(cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
               test: tuple[torch.Tensor, torch.Tensor] | None = None, log=print):
    """Train the experts (see the module docstring); the training images and labels are not used (data-free)."""
    from diffguide.models import unet as unet_lib

    if cfg.tuning not in ppap_lib.TUNINGS:
        raise UserError(f"train.tuning={cfg.tuning!r} is not one of {', '.join(ppap_lib.TUNINGS)}")
    torch.manual_seed(cfg.seed)
    dtype = resolve_precision(cfg.precision)
    denoiser = unet_lib.load(cfg.model_weights).to(device).eval().requires_grad_(False)
    denoiser.set_precision(dtype)
    if denoiser.alphas_cumprod is None:
        raise UserError("PPAP experts are trained on a discrete-time model's schedule (train.model_weights)")
    scheduler = {k: v for k, v in dict(DDPMScheduler.from_config(denoiser.scheduler_config).config).items()
                 if not k.startswith("_")}
    alphas = denoiser.alphas_cumprod.float().cpu()
    start = time.time()
    cache = Path(cfg.transfer_set) if cfg.get("transfer_set") else None
    if cache is not None and cache.is_file():  # the same samples for another tuning (lora vs last, as compared)
        x0 = load_file(str(cache))["x0"]
        if len(x0) != cfg.num_generated:
            raise UserError(f"train.transfer_set={cache} holds {len(x0)} images, not num_generated="
                            f"{cfg.num_generated}: remove it or set num_generated")
    else:
        x0 = generate_transfer_set(denoiser, cfg.num_generated, cfg.gen_steps, cfg.gen_batch_size, cfg.seed, device,
                                   log)
        if cache is not None:
            atomic_write_bytes(cache, save_bytes({"x0": x0.contiguous()}))
    gen_wall = time.time() - start

    teacher = evaluator_lib.load(cfg.classifier_weights).to(device)
    if cfg.softplus_beta is not None:
        _relu_to_softplus(teacher.net, float(cfg.softplus_beta))
    q = soft_targets(teacher, x0, cfg.temperature, device=device)
    boundaries = (list(cfg.boundaries) if cfg.get("boundaries") else
                  ppap_lib.uniform_boundaries(cfg.num_experts, len(alphas)))
    experts = ppap_lib.PPAPExperts(evaluator_lib.load(cfg.classifier_weights), boundaries, scheduler, cfg.tuning,
                                   cfg.lora_rank, cfg.last_blocks, cfg.softplus_beta).to(device)
    experts.requires_grad_(False)
    per_expert = []
    for k in range(experts.num_experts):
        lo, hi = boundaries[k], boundaries[k + 1]
        params = experts.expert_parameters(k)
        for p in params:
            p.requires_grad_(True)
        experts.train()
        experts.select(k)

        def batch_loss(generator, lo=lo, hi=hi, k=k):
            idx = torch.randint(0, len(x0), (cfg.batch_size,), generator=generator)
            t = torch.randint(lo, hi, (cfg.batch_size,), generator=generator)
            x_t = noised(alphas, x0[idx], t, torch.randn(x0[idx].shape, generator=generator))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = experts.logits_of(x_t.to(device), k)
            return transfer_loss(torch.log_softmax(logits.float(), 1), q[idx].to(device))

        log(f"expert {k}: timesteps [{lo}, {hi})")
        stats = train_loop(OmegaConf.merge(cfg, {"seed": cfg.seed + k}), params, batch_loss, device, log)
        per_expert.append({"timesteps": [lo, hi], "final_loss": round(stats["final_loss"], 4),
                           "first_loss": round(stats["first_loss"], 4), "wall_time_s": stats["wall_time_s"]})
        for p in params:
            p.requires_grad_(False)
    experts.eval()
    trainable = sum(p.numel() for k in range(experts.num_experts) for p in experts.expert_parameters(k))
    result = {"steps": cfg.steps, "experts": per_expert, "num_generated": cfg.num_generated,
              "generation_wall_s": round(gen_wall, 1), "wall_time_s": round(time.time() - start, 1),
              "trainable_parameters": trainable, "final_loss": sum(e["final_loss"] for e in per_expert) / len(per_expert),
              "hardware": hardware(device)}
    if test is not None:
        probe = [t for t in cfg.eval_timesteps]
        n = min(len(test[0]), cfg.eval_images)
        result["experts_accuracy"] = noisy_accuracy(experts, test[0][:n], test[1][:n], alphas, probe, device)
        clean = ppap_lib.PPAPExperts(evaluator_lib.load(cfg.classifier_weights), [0, len(alphas)], scheduler, "full",
                                     softplus_beta=cfg.softplus_beta).to(device)
        result["clean_classifier_accuracy"] = noisy_accuracy(clean, test[0][:n], test[1][:n], alphas, probe, device)
    ppap_lib.save(experts, Path(cfg.out), extra={"training": result})
    return experts, result
