"""DiT sampling speed: diffguide (LatentDiT + ddim + cfg) against diffusers' DiTPipeline on the same model, steps,
scale and batch, timed in one run (interleaved, median of --repeats); plus model FLOP utilisation against this
device's measured matmul rate.

    python scripts/bench_dit.py [--arch S] [--batch 8] [--steps 10] [--precision bf16] [--device cpu] [--compile]

Random weights with the architecture from config (nothing downloaded): --arch XL is DiT-XL/2 at 256x256 (about
119 GFLOPs a forward; a GPU job), S is DiT-S/2 at 256x256 (about 6 GFLOPs), tiny a 2-layer toy. The VAE is a small
random AutoencoderKL with the real one's 8x downsampling, shared by both pipelines, so that the ratio measures the
sampling loops; the VAE decode is timed separately.
"""

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from diffguide.guidance.cfg import CFG
from diffguide.models.dit import LatentDiT
from diffguide.runtime.device import resolve_precision
from diffguide.samplers.ddim import DDIM
from diffguide.store.samples import initial_noise, labels_for

ARCHS = {  # DiT paper, Table 1: layers, hidden size, heads; patch 2; 256x256 images -> 32x32x4 latents
    "XL": dict(num_layers=28, attention_head_dim=72, num_attention_heads=16),
    "B": dict(num_layers=12, attention_head_dim=64, num_attention_heads=12),
    "S": dict(num_layers=12, attention_head_dim=64, num_attention_heads=6),
    "tiny": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2),
}


def build(arch: str, device, dtype):
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(sample_size=32, patch_size=2, in_channels=4, out_channels=8,
                                        num_embeds_ada_norm=1000, **ARCHS[arch])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=[16, 16, 32, 32], sample_size=256)
    transformer, vae = transformer.to(device).eval(), vae.to(device).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                              timestep_spacing="trailing")
    return transformer, vae, scheduler


def matmul_rate(device, dtype, n=2048, repeats=5) -> float:
    """FLOP/s of a square matmul in `dtype` on `device` (the roofline the utilisation is measured against)."""
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="S", choices=sorted(ARCHS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (both pipelines)")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), resolve_precision(args.precision)
    transformer, vae, scheduler = build(args.arch, device, dtype)
    if args.compile:
        transformer.forward = torch.compile(transformer.forward)
    model = LatentDiT(transformer, vae, scheduler.config).to(device)
    model.set_precision(dtype)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).to(device)
    pipe.set_progress_bar_config(disable=True)
    indices = list(range(args.batch))
    labels = labels_for(indices, 1000).to(device)
    sampler, guidance = DDIM(args.steps, clip_x0=False), CFG(args.scale)

    @torch.no_grad()
    def ours():
        x_T, _ = initial_noise(indices, 0, model.sample_shape, device)
        x0, _ = sampler.sample(model, guidance, x_T, labels)
        return x0

    @torch.no_grad()
    def theirs():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            # DiTPipeline decodes inside its call; output_type="latent" is not offered, so both time their decode
            return pipe(class_labels=labels.tolist(), guidance_scale=args.scale, num_inference_steps=args.steps,
                        output_type="np").images

    @torch.no_grad()
    def ours_with_decode():
        return model.decode(ours())

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        x = torch.randn(2 * args.batch, 4, 32, 32, device=device)
        transformer(x, timestep=torch.full((2 * args.batch,), 500, device=device),
                    class_labels=torch.cat([labels, labels]))
    flops_per_image_forward = counter.get_total_flops() / (2 * args.batch)

    ours_with_decode(), theirs()  # warm-up (and compilation)
    times = {"diffguide": [], "DiTPipeline": [], "diffguide (no decode)": []}
    for _ in range(args.repeats):
        for name, fn in (("diffguide", ours_with_decode), ("DiTPipeline", theirs), ("diffguide (no decode)", ours)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    rate = matmul_rate(device, dtype)
    print(f"DiT-{args.arch}/2 256x256, {args.steps} DDIM steps, CFG w={args.scale}, batch {args.batch}, "
          f"{args.precision}, {device}{', compiled' if args.compile else ''}; "
          f"{flops_per_image_forward / 1e9:.3g} GFLOPs per image forward; matmul {rate / 1e12:.2f} TFLOP/s")
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in medians.items():
        images_per_s = args.batch / t
        util = images_per_s * 2 * args.steps * flops_per_image_forward / rate
        print(f"  {name:24s} {images_per_s:8.2f} images/s   model FLOP utilisation {100 * util:5.1f}%")
    print(f"  diffguide / DiTPipeline speed ratio: {medians['DiTPipeline'] / medians['diffguide']:.3f}")


if __name__ == "__main__":
    main()
