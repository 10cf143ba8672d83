"""Memory, parameters and speed of stage-1 guidance distillation: the full student against the LoRA student.

    python scripts/bench_distill.py [--steps 20] [--batch 64] [--precision bf16]

Each variant trains --steps steps of `diffguide.training.distill.train_guided_student` on 4096 Fashion-MNIST training images in
a fresh process (so that peak memory is its own); a third process loads the same libraries, data and teacher and
trains nothing: its peak is subtracted. Printed per variant: parameters (all, trainable, stored in its checkpoint),
checkpoint bytes, peak resident memory above the idle process, and seconds per training step, in one run.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(variant: str, steps: int, batch: int, precision: str) -> None:
    import torch
    from omegaconf import OmegaConf

    from diffguide.training import distill
    from diffguide.store.checkpoint import asset_path
    from diffguide.data import fashion_mnist
    from diffguide.models import unet as unet_lib

    images, labels = fashion_mnist.load("train")
    images, labels = images[:4096], labels[:4096]
    teacher = asset_path("fmnist_unet.safetensors")
    out = Path(tempfile.mkdtemp()) / "student.safetensors"
    result = {"variant": variant}
    if variant == "idle":
        unet_lib.load(teacher)
    else:
        cfg = OmegaConf.create(dict(
            name=variant, out=str(out), teacher=teacher, w_range=[1.0, 4.0],
            lora={"r": 8, "alpha": 8, "target_modules": ["conv1", "conv2", "time_emb_proj"]} if variant == "lora"
            else None, steps=steps, batch_size=batch, lr=1e-4, warmup_steps=1, weight_decay=0.0, ema_decay=0.99,
            precision=precision, seed=0, log_every=10 ** 9, checkpoint_every=0))
        start = time.perf_counter()
        _, stats = distill.train_guided_student(cfg, images, labels, torch.device("cpu"), log=lambda *_: None)
        result.update(seconds_per_step=(time.perf_counter() - start) / steps, file_bytes=out.stat().st_size,
                      **{k: stats[k] for k in ("parameters", "trainable", "stored")})
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.batch, args.precision)
        return
    results = {}
    for variant in ("idle", "full", "lora"):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--steps", str(args.steps), "--batch",
                               str(args.batch), "--precision", args.precision], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{variant} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    idle = results["idle"]["peak_rss_mib"]
    print(f"stage-1 distillation, batch {args.batch}, {args.precision}, {args.steps} steps per variant; peak memory "
          f"above an idle process ({idle:.0f} MiB)")
    print("| variant | parameters | trainable | stored | checkpoint | peak memory above idle | s / step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for variant in ("full", "lora"):
        r = results[variant]
        print(f"| {variant} | {r['parameters']:,} | {r['trainable']:,} | {r['stored']:,} | "
              f"{r['file_bytes'] / 2 ** 20:.2f} MiB | {r['peak_rss_mib'] - idle:.0f} MiB | {r['seconds_per_step']:.2f} |")
    full, lora = results["full"], results["lora"]
    print(f"LoRA / full: trainable {lora['trainable'] / full['trainable']:.3f}, checkpoint "
          f"{lora['file_bytes'] / full['file_bytes']:.3f}, peak memory above idle "
          f"{(lora['peak_rss_mib'] - idle) / (full['peak_rss_mib'] - idle):.2f}, time per step "
          f"{lora['seconds_per_step'] / full['seconds_per_step']:.2f}")


if __name__ == "__main__":
    main()
