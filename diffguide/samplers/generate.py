"""Sampling: the missing samples of a run, batch by batch, each written to the sample store as soon as it is made."""

import sys
import time

import torch
from tqdm import tqdm

from diffguide.store.atomic import DiskFull, human_bytes
from diffguide.runtime.distributed import Shard
from diffguide.errors import UserError
from diffguide.models.text import is_text
from diffguide.store.samples import SampleStore, initial_noise, labels_for, to_uint8


def step_count(sampler, denoiser) -> int:
    """The sampler's steps for this model (one tick of the progress bar each)."""
    return len(sampler.levels(denoiser))


def noise_levels(sampler, denoiser) -> dict:
    """The trajectory on the common noise-level axis, for metrics.json: the EDM sigma of every step (the string
    "inf" for a flow model's pure noise), the model's own time there, and the family's schedule."""
    levels = sampler.levels(denoiser)
    return {"schedule": type(denoiser.schedule).__name__, "parameterisation": denoiser.parameterisation.name,
            "sigmas": [round(level.sigma, 6) if level.alpha > 0 else "inf" for level in levels],
            "times": [level.t if isinstance(level.t, int) else round(level.t, 6) for level in levels]}


def generate(denoiser, sampler, guidance, store: SampleStore, device, logger, *, num_samples: int, batch_size: int,
             seed: int, shard: Shard = Shard(), attempts=None) -> dict:
    """Make the samples of 0..num_samples-1 that `store` lacks (this shard's share of them), `batch_size` at a time;
    sample i starts from seed + i; `attempts` (store.results.Attempts) records the images and seconds so far after
    every batch. Returns the counts and wall time of this process's sampling."""
    missing = shard.mine(store.missing(num_samples))
    batches = [missing[i:i + batch_size] for i in range(0, len(missing), batch_size)]
    steps = step_count(sampler, denoiser)
    start = time.perf_counter()
    done = 0
    what = f"sampling {len(missing)} of {num_samples}" + (f" (rank {shard.rank})" if shard.world > 1 else "")
    # A bar on a terminal only (disable=None): in logs and pipes it is noise, and stderr stays for what went wrong.
    bar = tqdm(total=len(batches) * steps, desc=what, unit="step", disable=None if batches else True,
               file=sys.stderr)
    try:
        def on_step(step: int, total: int) -> None:
            bar.update(1)
            logger.progress({"step": bar.n, "batch_step": step, "elapsed_s": time.perf_counter() - start})

        for indices in batches:
            x_T, generators = initial_noise(indices, seed, denoiser.sample_shape, device)
            labels = labels_for(indices, denoiser.num_classes).to(device)
            x0, nfe = sampler.sample(denoiser, guidance, x_T, labels, generators, on_step=on_step)
            if not torch.isfinite(x0).all():
                bad = [i for i, ok in zip(indices, torch.isfinite(x0).flatten(1).all(1).tolist()) if not ok]
                raise UserError(f"sampling diverged to NaN/inf for {len(bad)} of {len(indices)} samples (first: "
                                f"{bad[0]}); the guidance scale is likely too large. Nothing of this batch was written")
            pixels = to_uint8(denoiser.decode(x0))
            nfe_each = nfe.tolist() if torch.is_tensor(nfe) else [float(nfe)] * len(indices)
            for index, image, label, sample_nfe in zip(indices, pixels, labels.tolist(), nfe_each):
                meta = {"seed": seed + index, "label": label, "nfe": sample_nfe, "run": store.run_id}
                if is_text(denoiser):  # the prompt (and negative prompt) travel with the image
                    prompt, negative = denoiser.prompt_of(label)
                    meta.update(prompt=prompt, negative_prompt=negative)
                try:
                    store.write(index, image, meta)
                except DiskFull as exc:
                    left = len(missing) - done
                    sizes = [p.stat().st_size for p in list(store.dir.glob("*.png"))[:100]] or [image.nbytes]
                    raise DiskFull(f"{exc}; the {left} samples still to make need about "
                                   f"{human_bytes(left * sum(sizes) / len(sizes))}") from None
                done += 1
            elapsed = time.perf_counter() - start
            if attempts is not None:
                attempts.record(done, elapsed)
            logger.progress({"step": bar.n, "images": num_samples - len(missing) + done,
                             "images_per_s": done / elapsed})
    except BaseException:
        bar.leave = False  # what went wrong is the last word, not a half-finished bar
        raise
    finally:
        bar.close()
    wall = time.perf_counter() - start
    if attempts is not None and done:
        attempts.record(done, round(wall, 3))  # the attempt's own total, as its sampling_wall_s says
    return {"images_generated": done, "sampling_wall_s": round(wall, 3),
            "images_per_s": round(done / wall, 3) if done else None}
