"""Sampling speed on the embedded model: images/s of the guided loop and its overhead over bare network forwards.

    python scripts/bench_sampling.py [--batch 250] [--steps 25] [--precision bf16] [--repeats 3]

Three ways to make the same images, timed in one run and interleaved (median of --repeats):
  bare       the network forwards alone that CFG needs (one batch of 2B per step), no sampler arithmetic;
  diffusers  the loop people write by hand: DDIMScheduler.step with CFG done on the chunked batched output;
  diffguide  our DDIM sampler with our CFG guidance (and with no guidance and CFG++ for reference);
  students   the guidance-distilled students (guidance=distilled, one forward of B per step): stage 1 and its LoRA
             variant at --steps, the progressive students at their own step counts, CFG at those step counts too.
"""

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler

from diffguide.store.checkpoint import asset_path
from diffguide.guidance.cfg import CFG
from diffguide.guidance.cfgpp import CFGPlusPlus
from diffguide.guidance.distilled import Distilled
from diffguide.guidance.none import NoGuidance
from diffguide.models import student as student_lib
from diffguide.models import unet as unet_lib
from diffguide.runtime.device import resolve_precision
from diffguide.samplers.ddim import DDIM
from diffguide.store.samples import initial_noise, labels_for


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=asset_path("fmnist_unet.safetensors"))
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-students", action="store_true", help="leave out the distilled students")
    args = parser.parse_args()

    dtype = resolve_precision(args.precision)
    model = unet_lib.load(args.weights)
    model.set_precision(dtype)
    indices = list(range(args.batch))
    x_T, _ = initial_noise(indices, 0, model.sample_shape, torch.device("cpu"))
    labels = labels_for(indices, model.num_classes)
    sampler = DDIM(args.steps, clip_x0=False)
    timesteps = sampler.timesteps(model)

    @torch.no_grad()
    def bare():
        x2, y2 = torch.cat([x_T, x_T]), torch.cat([labels, model.null_labels(labels)])
        for t in timesteps:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                model.unet(x2, torch.full((len(x2),), t), class_labels=y2)

    @torch.no_grad()
    def diffusers_loop():
        scheduler = DDIMScheduler.from_config(model.scheduler_config, timestep_spacing="trailing", clip_sample=False)
        scheduler.set_timesteps(args.steps)
        x, y2 = x_T, torch.cat([labels, model.null_labels(labels)])
        for t in scheduler.timesteps:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                eps = model.unet(torch.cat([x, x]), t, class_labels=y2).sample.float()
            eps_c, eps_u = eps.chunk(2)
            x = scheduler.step(eps_u + args.scale * (eps_c - eps_u), t, x).prev_sample
        return x

    def ours(guidance):
        return lambda: sampler.sample(model, guidance, x_T, labels)[0]

    cases = {"bare forwards (2B per step)": bare, "diffusers DDIM + CFG loop": diffusers_loop,
             "diffguide ddim + cfg": ours(CFG(args.scale)), "diffguide ddim + cfgpp": ours(CFGPlusPlus(0.6)),
             "diffguide ddim + none": ours(NoGuidance())}
    if not args.no_students:
        cases.update(students(args, dtype, x_T, labels))
    # Same images from both CFG loops: the comparison is of equal work. Checked in fp32: in bf16 the loops' float32
    # vs float64 schedule constants differ in the last bits and bf16 rounding amplifies that over the steps.
    # (diffusers' DDIM steps to t - T // steps, the next listed timestep only when the step count divides T.)
    if model.num_train_timesteps % args.steps == 0:
        dtype, model.autocast_dtype = None, None
        difference = (diffusers_loop() - cases["diffguide ddim + cfg"]()).abs().max().item()
        dtype = model.autocast_dtype = resolve_precision(args.precision)
        assert difference < 1e-3, f"the two CFG loops disagree by {difference}"
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"batch {args.batch}, {args.steps} DDIM steps, {args.precision}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for name, seconds in median.items():
        print(f"  {name:30s} {args.batch / seconds:8.1f} images/s  ({seconds:.2f} s)")
    bare_s = median["bare forwards (2B per step)"]
    print(f"overhead of the guided loop over bare forwards (cfg): "
          f"{median['diffguide ddim + cfg'] / bare_s:.3f}x")
    print(f"diffguide cfg loop vs hand-written diffusers loop: "
          f"{median['diffusers DDIM + CFG loop'] / median['diffguide ddim + cfg']:.3f}x the speed")
    cfg_s = median["diffguide ddim + cfg"]
    for name, seconds in median.items():
        if name.startswith("student") or name.startswith("cfg at"):
            print(f"{name} vs cfg at {args.steps} steps: {cfg_s / seconds:.2f}x the images/s")


def students(args, dtype, x_T, labels) -> dict:
    """The distilled students' sampling loops (those whose weights are present), and CFG at their step counts."""
    from pathlib import Path

    teacher = asset_path("fmnist_unet.safetensors")
    found = {f"student (stage 1), {args.steps} steps": ("fmnist_guided_student", args.steps),
             f"student (LoRA), {args.steps} steps": ("fmnist_guided_student_lora", args.steps),
             "student (progressive), 8 steps": ("fmnist_guided_student_8step", 8),
             "student (progressive), 4 steps": ("fmnist_guided_student_4step", 4)}
    cases = {}
    for name, (weights, steps) in found.items():
        path = asset_path(f"{weights}.safetensors")
        if not Path(path).is_file():
            print(f"(no {weights}: left out)")
            continue
        model = student_lib.load(path, teacher=teacher if "lora" in weights else None)
        model.set_precision(dtype)
        cases[name] = (lambda m, n: lambda: DDIM(n, clip_x0=False).sample(m, Distilled(args.scale), x_T, labels)[0])(
            model, steps)
    base = unet_lib.load(teacher)
    base.set_precision(dtype)
    for steps in (8, 4):
        cases[f"cfg at {steps} steps"] = (lambda n: lambda: DDIM(n, clip_x0=False).sample(
            base, CFG(args.scale), x_T, labels)[0])(steps)
    return cases


if __name__ == "__main__":
    main()
