"""`python -m diffguide.run [-m] key=value ...`: sample with a guidance method, then score the samples."""

import json
import math
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from diffguide import checkpoint, distributed
from diffguide.distributed import Shard
from diffguide.logging.base import NoLogger
from diffguide.config import CONF_DIR, register
from diffguide.errors import UserError
from diffguide.runtime import resolve_device, resolve_precision
from diffguide.samples import SampleStore, initial_noise, labels_for, to_uint8

register()


def validate(cfg: DictConfig) -> None:
    """Range checks the schema's types cannot express; one clear message for the first problem."""
    for key, lo in (("steps", 1), ("num_samples", 1), ("batch_size", 1), ("seed", 0), ("grid_size", 0)):
        if cfg[key] < lo:
            raise UserError(f"{key} must be >= {lo} (got {cfg[key]})")
    if cfg.scale is not None and not math.isfinite(cfg.scale):
        raise UserError(f"scale must be a finite number (got {cfg.scale})")


def _instantiate(node):
    """hydra.utils.instantiate, with a UserError raised inside a target surfaced as it is (Hydra wraps it)."""
    try:
        return instantiate(node)
    except Exception as exc:
        cause = exc
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def fingerprint(cfg: DictConfig) -> dict:
    """The settings an image depends on (not batch size, device split or sample count)."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    fp = {key: resolved[key] for key in ("model", "sampler", "guidance", "classifier", "seed", "precision")}
    weights = resolved["model"].get("weights") if isinstance(resolved["model"], dict) else None
    if weights and Path(weights).is_file():
        fp["model_weights_sha256"] = checkpoint.file_digest(weights, 16)
    return fp


def job_identity(out_dir: Path) -> tuple[str, str | None]:
    """A name for the job (its folder's) and, in a sweep, the group it belongs to (the sweep folder's name)."""
    hc = HydraConfig.get()
    return out_dir.name, Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None


def generate(cfg, denoiser, sampler, guidance, store: SampleStore, device, logger, shard: Shard = Shard()) -> dict:
    missing = shard.mine(store.missing(cfg.num_samples))
    batches = [missing[i:i + cfg.batch_size] for i in range(0, len(missing), cfg.batch_size)]
    steps = len(sampler.timesteps(denoiser))
    start = time.perf_counter()
    done = 0
    what = f"sampling {len(missing)} of {cfg.num_samples}" + (f" (rank {shard.rank})" if shard.world > 1 else "")
    with tqdm(total=len(batches) * steps, desc=what, unit="step", disable=not batches, file=sys.stderr) as bar:

        def on_step(step: int, total: int) -> None:
            bar.update(1)
            logger.progress({"step": bar.n, "batch_step": step, "elapsed_s": time.perf_counter() - start})

        for indices in batches:
            x_T, generators = initial_noise(indices, cfg.seed, denoiser.sample_shape, device)
            labels = labels_for(indices, denoiser.num_classes).to(device)
            x0, nfe = sampler.sample(denoiser, guidance, x_T, labels, generators, on_step=on_step)
            if not torch.isfinite(x0).all():
                bad = [i for i, ok in zip(indices, torch.isfinite(x0).flatten(1).all(1).tolist()) if not ok]
                raise UserError(f"sampling diverged to NaN/inf for {len(bad)} of {len(indices)} samples (first: "
                                f"{bad[0]}); the guidance scale is likely too large. Nothing of this batch was written")
            pixels = to_uint8(denoiser.decode(x0))
            nfe_each = nfe.tolist() if torch.is_tensor(nfe) else [float(nfe)] * len(indices)
            for index, image, label, sample_nfe in zip(indices, pixels, labels.tolist(), nfe_each):
                store.write(index, image, {"seed": cfg.seed + index, "label": label, "nfe": sample_nfe})
            done += len(indices)
            elapsed = time.perf_counter() - start
            logger.progress({"step": bar.n, "images": cfg.num_samples - len(missing) + done,
                             "images_per_s": done / elapsed})
    wall = time.perf_counter() - start
    return {"images_generated": done, "sampling_wall_s": round(wall, 3),
            "images_per_s": round(done / wall, 3) if done else None}


def run(cfg: DictConfig) -> dict:
    total_start = time.perf_counter()
    validate(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    shard, device = distributed.setup(resolve_device(cfg.device))
    if shard.world > 1 and cfg.out_dir is None:
        raise UserError(f"a run over {shard.world} processes needs out_dir= (every rank must write to the same "
                        f"folder, and the default one is named by each process's clock)")
    dtype = resolve_precision(cfg.precision.value if hasattr(cfg.precision, "value") else cfg.precision)

    # Build and check everything before any long work: a bad config or a missing file fails here.
    denoiser = _instantiate(cfg.model).to(device)
    denoiser.set_precision(dtype)
    sampler = _instantiate(cfg.sampler)
    sampler.check(denoiser)
    guidance = _instantiate(cfg.guidance)
    guidance.start(denoiser, labels_for([0], denoiser.num_classes))
    metric = _instantiate(cfg.metric)
    metric.check()
    store = SampleStore(out_dir)
    if shard.main:  # one rank records the settings and clears a killed run's temp files, before anyone writes
        store.claim(fingerprint(cfg))
    shard.barrier()
    if not shard.main:
        store.claim(fingerprint(cfg), clean=False)
    logger = _instantiate(cfg.logger) if shard.main else NoLogger()

    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if shard.main:
        checkpoint.atomic_write_text(out_dir / "config.resolved.yaml", OmegaConf.to_yaml(resolved))
    name, group = job_identity(out_dir)
    logger.start(resolved, out_dir, name, group)
    try:
        sampling = generate(cfg, denoiser, sampler, guidance, store, device, logger, shard)
        if shard.world > 1:
            # Scoring waits for every shard; the counts and the rate are those of the whole run.
            generated = int(shard.total(sampling["images_generated"]))
            wall = shard.maximum(sampling["sampling_wall_s"])
            sampling = {"images_generated": generated, "sampling_wall_s": wall,
                        "images_per_s": round(generated / wall, 3) if generated and wall else None,
                        "processes": shard.world}
        if not shard.main:
            return sampling
        metas = store.metadata(cfg.num_samples)
        store.write_labels(metas)
        grid = store.write_grid(cfg.grid_size)
        score_start = time.perf_counter()
        scores = metric(store.dir, [m["label"] for m in metas], device)
        result = {"guidance": guidance.name, "scale": guidance.scale, "sampler": sampler.name, "steps": cfg.steps,
                  **scores, "nfe": sum(m["nfe"] for m in metas) / len(metas), "num_samples": cfg.num_samples,
                  **sampling, "scoring_wall_s": round(time.perf_counter() - score_start, 3),
                  "wall_time_s": round(time.perf_counter() - total_start, 3), "device": str(device),
                  "config": resolved}
        checkpoint.atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
        (out_dir / "failed.json").unlink(missing_ok=True)  # an earlier attempt's failure is no longer true
    except BaseException:
        logger.finish({}, None)
        raise
    finally:
        distributed.teardown()
    logger.finish(result, grid)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}))
    return result


#: points of this process's sweep that failed (a multirun goes on past them)
FAILED: list[str] = []


def record_failure(cfg: DictConfig, reason: str) -> None:
    """failed.json beside the point's other files: what was asked and why it stopped (diffguide.report reads it)."""
    try:
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        guidance = OmegaConf.select(cfg, "guidance._target_", default="") or ""
        failure = {"guidance": guidance.rsplit(".", 1)[-1], "scale": OmegaConf.select(cfg, "scale", default=None),
                   "sampler": (OmegaConf.select(cfg, "sampler._target_", default="") or "").rsplit(".", 1)[-1],
                   "steps": OmegaConf.select(cfg, "steps", default=None), "reason": reason,
                   "overrides": list(HydraConfig.get().overrides.task)}
        checkpoint.atomic_write_text(out_dir / "failed.json", json.dumps(failure, indent=2))
    except Exception as exc:  # recording a failure must never hide the failure itself
        print(f"diffguide: could not write failed.json: {exc}", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run(cfg)
    except (UserError, OmegaConfBaseException) as exc:
        reason = str(exc).splitlines()[0]
    except Exception as exc:
        if not multirun:
            raise
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        return
    record_failure(cfg, reason)
    print(f"diffguide: error: {reason}", file=sys.stderr)
    if not multirun:
        sys.exit(2)
    # In a sweep, one bad point is recorded and the others still run; the process exits non-zero at the end.
    FAILED.append(f"{HydraConfig.get().job.override_dirname or HydraConfig.get().runtime.output_dir}: {reason}")


if __name__ == "__main__":
    main()
    if FAILED:
        print(f"diffguide: {len(FAILED)} point(s) of the sweep failed (failed.json in each):", file=sys.stderr)
        for line in FAILED:
            print(f"  {line}", file=sys.stderr)
        sys.exit(1)
