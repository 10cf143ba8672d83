"""diffguide's guided loop against the diffusers pipeline on the same text-to-image model, steps and scale, timed in
one run: images/s of each (median of alternating repeats), their ratio, and on a GPU the peak memory of each.

    python scripts/bench_t2i.py                       # a small random SD-like UNet on this CPU
    python scripts/bench_t2i.py --size sd15 --batch 8 --batch 64 --device cuda   # SD 1.5's UNet size, random weights
    python scripts/bench_t2i.py --size sdxl --batch 8 --device cuda

Both sides encode the prompts, run CFG (one batched forward of the conditional and unconditional halves a step) with
DDIM at leading spacing, and decode with the VAE; neither writes files. The pipeline is given the same components
(diffguide's Denoiser wraps the pipeline's own UNet, VAE and encoders).
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffguide.data.prompts import PromptSet  # noqa: E402
from diffguide.guidance.cfg import CFG  # noqa: E402
from diffguide.models.stable_diffusion import StableDiffusion, StableDiffusionXL  # noqa: E402
from diffguide.samplers.ddim import DDIM  # noqa: E402
from diffguide.store.samples import initial_noise  # noqa: E402

PROMPTS = ["a red wool sweater on a wooden table", "an astronaut riding a horse on the moon",
           "a bowl of ramen, top view", "a corgi on a beach"]


def build(size: str, folder: Path):
    """A random-weight pipeline: `small` (CPU-sized), or the UNet/VAE/encoder shapes of SD 1.5 or SDXL."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tests.tiny_t2i import clip_text_config, clip_tokenizer

    torch.manual_seed(0)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1)
    if size == "small":
        tokenizer = clip_tokenizer(folder / "tok", max_length=77)
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                    norm_num_groups=8, attention_head_dim=4)
        vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
        encoder = CLIPTextModel(clip_text_config(tokenizer, hidden=64, max_length=77))
        return StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False), StableDiffusion
    tokenizer = clip_tokenizer(folder / "tok", max_length=77)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2)
    if size == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        encoder = CLIPTextModel(clip_text_config(tokenizer, hidden=768, max_length=77))
        return StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False), StableDiffusion
    unet = UNet2DConditionModel(sample_size=128, block_out_channels=(320, 640, 1280),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                                cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                                projection_class_embeddings_input_dim=2816, use_linear_projection=True)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(clip_text_config(tokenizer, 768, None, 77)),
                                     text_encoder_2=CLIPTextModelWithProjection(
                                         clip_text_config(tokenizer, 1280, 1280, 77)),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=scheduler), StableDiffusionXL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "sd15", "sdxl"), default="small")
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        pipe, family = build(args.size, Path(tmp))
    pipe = pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    model = family(pipe, decode_batch_size=64).eval().requires_grad_(False)
    model.set_precision(None if dtype == torch.float32 else dtype)  # weights already in dtype: autocast is a no-op
    sampler, guidance = DDIM(args.steps, spacing="leading", clip_x0=False), CFG(args.scale)
    print(f"# {args.size} UNet ({sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f}M parameters), "
          f"{args.steps} DDIM steps, CFG {args.scale}, {args.dtype}, {device}")
    for batch in args.batch or [8]:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        model.set_prompts(PromptSet(tuple(prompts), (None,) * batch))
        labels = torch.arange(batch, device=device)

        def ours():
            model._cache.clear()  # encode the prompts again each time, as the pipeline does
            x_T, generators = initial_noise(range(batch), 0, model.sample_shape, device)
            with torch.no_grad():
                x0, _ = sampler.sample(model, guidance, x_T, labels, generators)
                return model.decode(x0)

        def theirs():
            generators = [torch.Generator(device).manual_seed(i) for i in range(batch)]
            return pipe(prompts, guidance_scale=args.scale, num_inference_steps=args.steps, generator=generators,
                        output_type="pt").images

        times = {"diffguide": [], "pipeline": []}
        peaks = {}
        for name, fn in (("diffguide", ours), ("pipeline", theirs)):
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("diffguide", ours), ("pipeline", theirs)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
                times[name].append(time.perf_counter() - start)
        rate = {name: batch / statistics.median(t) for name, t in times.items()}
        memory = (f", peak memory {peaks['diffguide'] / 2**30:.2f} GiB vs {peaks['pipeline'] / 2**30:.2f} GiB "
                  f"(ratio {peaks['diffguide'] / peaks['pipeline']:.3f})" if peaks else "")
        print(f"batch {batch}: diffguide {rate['diffguide']:.2f} images/s, pipeline {rate['pipeline']:.2f} images/s, "
              f"ratio {rate['diffguide'] / rate['pipeline']:.3f}{memory}")


if __name__ == "__main__":
    main()
