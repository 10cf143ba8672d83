"""`python -m diffguide.run [-m] key=value ...`: sample with a guidance method, then score the samples."""

import errno
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path


def _interrupted_hook(kind, value, tb, _default=sys.excepthook):
    """Ctrl-C while the libraries import: one line, not an import traceback (after that, `entry` answers it)."""
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted before any work started; nothing was written", file=sys.stderr, flush=True)
        os._exit(130)
    _default(kind, value, tb)


sys.excepthook = _interrupted_hook

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra._internal.utils import get_args_parser
from hydra.errors import HydraException, InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from diffguide import checkpoint, cli, distributed
from diffguide.distributed import Shard
from diffguide.logging.base import NoLogger
from diffguide.config import CONF_DIR, register
from diffguide.errors import UserError
from diffguide.runtime import resolve_device, resolve_precision
from diffguide.samples import SampleStore, initial_noise, labels_for, run_digest, to_uint8

register()
SEED_MAX = 2 ** 64 - 1


def validate(cfg: DictConfig) -> None:
    """Range checks the schema's types cannot express; one clear message for the first problem."""
    for key, lo in (("steps", 1), ("num_samples", 1), ("batch_size", 1), ("seed", 0), ("grid_size", 0)):
        if cfg[key] < lo:
            raise UserError(f"{key} must be >= {lo} (got {cfg[key]})")
    if cfg.scale is not None and not math.isfinite(cfg.scale):
        raise UserError(f"scale must be a finite number (got {cfg.scale})")
    resolve_device(cfg.device)
    if cfg.seed + cfg.num_samples - 1 > SEED_MAX:  # sample i is seeded with seed + i, a 64-bit generator seed
        raise UserError(f"seed + num_samples - 1 must be <= {SEED_MAX} (2^64 - 1), the largest generator seed "
                        f"(got seed={cfg.seed}, num_samples={cfg.num_samples})")


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


#: paths in a config that a run writes to rather than reads from
_NOT_INPUTS = {"cache_root"}


def dependency_files(node, prefix: str) -> dict[str, str]:
    """config key -> path, for every value under `node` that names an existing file or folder (weights, a weak model,
    a classifier, a hub folder): what the images depend on besides the settings themselves."""
    found = {}
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in _NOT_INPUTS:
                found.update(dependency_files(value, f"{prefix}.{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.update(dependency_files(value, f"{prefix}.{i}"))
    elif isinstance(node, str) and node and (Path(node).is_file() or ("/" in node and Path(node).is_dir())):
        found[prefix] = node  # a folder only when written as a path: a bare word may match a folder by chance
    return found


#: Keys added to a group after samples were first recorded, with the default that reproduces the images made before
#: they existed: left out of the fingerprint at that default, so that a folder made before them still resumes (its
#: sampling.json and every sample's `run` digest stay what they were).
ADDED_KEYS = {("sampler", "variance"): "fixed_small", ("guidance", "channels"): None}


def revision(node) -> int:
    """The `revision` of the class a config node's `_target_` names (0 when it has none, or names a function): a
    class raises it when a correction changes the images its unchanged settings make."""
    target = node.get("_target_") if isinstance(node, dict) else None
    if not isinstance(target, str):
        return 0
    try:
        return int(getattr(get_class(target), "revision", 0))
    except (ImportError, ValueError, AttributeError):
        return 0


def fingerprint(cfg: DictConfig) -> tuple[dict, dict[str, str]]:
    """The settings an image depends on (not batch size, device split or sample count), with the content digest of
    every file they name, and the code revision of the sampler and guidance where it is not 0; and those files'
    paths by config key (to name the one that changed)."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    keys = ("model", "sampler", "guidance", "classifier", "seed", "precision")
    fp = {key: resolved[key] for key in keys}
    for (group, key), default in ADDED_KEYS.items():
        if isinstance(fp[group], dict) and key in fp[group] and fp[group][key] == default:
            fp[group] = {k: v for k, v in fp[group].items() if k != key}
    for group in ("sampler", "guidance"):
        code = revision(fp[group])
        if code:
            fp[group] = {**fp[group], "_revision": code}
    files = {}
    for key in ("model", "sampler", "guidance", "classifier"):
        files.update(dependency_files(resolved[key], key))
    fp["files"] = {key: checkpoint.path_digest(path) for key, path in sorted(files.items())}
    return fp, files


def job_identity(out_dir: Path) -> tuple[str, str | None]:
    """A name for the job (its folder's) and, in a sweep, the group it belongs to (the sweep folder's name)."""
    hc = HydraConfig.get()
    return out_dir.name, Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None


class Progress:
    """What a Ctrl-C or a full disk reports: how many of the run's samples are on disk."""

    store: SampleStore | None = None
    total: int = 0

    @classmethod
    def kept(cls) -> str:
        if cls.store is None:
            return "before sampling; nothing was written"
        return f"{len(cls.store.existing() & set(range(cls.total)))} of {cls.total} samples kept in {cls.store.dir}"


def generate(cfg, denoiser, sampler, guidance, store: SampleStore, device, logger, shard: Shard = Shard()) -> dict:
    missing = shard.mine(store.missing(cfg.num_samples))
    batches = [missing[i:i + cfg.batch_size] for i in range(0, len(missing), cfg.batch_size)]
    steps = len(sampler.timesteps(denoiser))
    start = time.perf_counter()
    done = 0
    what = f"sampling {len(missing)} of {cfg.num_samples}" + (f" (rank {shard.rank})" if shard.world > 1 else "")
    # A bar on a terminal only (disable=None): in logs and pipes it is noise, and stderr stays for what went wrong.
    bar = tqdm(total=len(batches) * steps, desc=what, unit="step", disable=None if batches else True,
               file=sys.stderr)
    try:
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
                try:
                    store.write(index, image, {"seed": cfg.seed + index, "label": label, "nfe": sample_nfe,
                                               "run": store.run_id})
                except checkpoint.DiskFull as exc:
                    left = len(missing) - done
                    sizes = [p.stat().st_size for p in list(store.dir.glob("*.png"))[:100]] or [image.nbytes]
                    raise checkpoint.DiskFull(f"{exc}; the {left} samples still to make need about "
                                              f"{checkpoint.human_bytes(left * sum(sizes) / len(sizes))}") from None
                done += 1
            elapsed = time.perf_counter() - start
            logger.progress({"step": bar.n, "images": cfg.num_samples - len(missing) + done,
                             "images_per_s": done / elapsed})
    except BaseException:
        bar.leave = False  # what went wrong is the last word, not a half-finished bar
        raise
    finally:
        bar.close()
    wall = time.perf_counter() - start
    return {"images_generated": done, "sampling_wall_s": round(wall, 3),
            "images_per_s": round(done / wall, 3) if done else None}


def run(cfg: DictConfig) -> dict:
    total_start = time.perf_counter()
    validate(cfg)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    shard, device = distributed.setup(resolve_device(cfg.device))
    try:
        return _run(cfg, out_dir, shard, device, total_start)
    finally:
        distributed.teardown()


def _run(cfg: DictConfig, out_dir: Path, shard: Shard, device: torch.device, total_start: float) -> dict:
    if shard.world > 1 and cfg.out_dir is None:
        raise UserError(f"a run over {shard.world} processes needs out_dir= (every rank must write to the same "
                        f"folder, and the default one is named by each process's clock)")
    dtype = resolve_precision(cfg.precision.value if hasattr(cfg.precision, "value") else cfg.precision)

    # Build and check everything before any long work: a bad config or a missing file fails here, as one line:
    # the libraries' warnings of this phase are shown only once it has passed.
    with warnings.catch_warnings(record=True) as caught:
        denoiser = _instantiate(cfg.model).to(device)
        denoiser.set_precision(dtype)
        sampler = _instantiate(cfg.sampler)
        sampler.check(denoiser)
        guidance = _instantiate(cfg.guidance)
        guidance.start(denoiser, labels_for([0], denoiser.num_classes))
        metric = _instantiate(cfg.metric)
        metric.check(cfg.num_samples)
        settings, files = fingerprint(cfg)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)

    store = SampleStore(out_dir)
    problem = None
    if shard.main:  # rank 0 holds the folder for the whole job and readies it before any rank writes
        try:
            store.lock()
            store.clean()
            store.run_id = store.claim(settings, files)
            remade = store.verify(cfg.num_samples, denoiser.image_shape, cfg.seed, denoiser.num_classes, store.run_id)
            if remade:
                print(f"diffguide: warning: {len(remade)} existing sample(s) are damaged or not this run's and will be "
                      f"made again ({'; '.join(remade[:3])}{'; ...' if len(remade) > 3 else ''})", file=sys.stderr)
        except BaseException as exc:
            store.release()
            if not isinstance(exc, UserError):
                raise
            problem = exc
    if shard.world > 1 and shard.total(problem is not None):  # every rank learns whether rank 0 could start
        raise problem or UserError("rank 0 could not take the run folder (its error says why)")
    if problem is not None:
        raise problem
    if not shard.main:
        store.run_id = run_digest(settings)
    Progress.store, Progress.total = store, cfg.num_samples
    try:
        return _sample_and_score(cfg, out_dir, shard, device, total_start, denoiser, sampler, guidance, metric,
                                 store, settings["files"])
    finally:
        store.release()


def _sample_and_score(cfg, out_dir, shard, device, total_start, denoiser, sampler, guidance, metric, store,
                      file_digests: dict[str, str]) -> dict:
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
        metric_files = dependency_files(resolved["metric"], "metric") if isinstance(resolved["metric"], dict) else {}
        result = {"guidance": guidance.name, "scale": guidance.scale, "sampler": sampler.name, "steps": cfg.steps,
                  **scores, "nfe": sum(m["nfe"] for m in metas) / len(metas), "num_samples": cfg.num_samples,
                  **sampling, "scoring_wall_s": round(time.perf_counter() - score_start, 3),
                  "wall_time_s": round(time.perf_counter() - total_start, 3), "device": str(device),
                  "files_sha256": {**file_digests,
                                   **{k: checkpoint.path_digest(p) for k, p in metric_files.items()}},
                  "config": resolved}
        checkpoint.atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
        (out_dir / "failed.json").unlink(missing_ok=True)  # an earlier attempt's failure is no longer true
    except BaseException:
        logger.finish({}, None)
        raise
    logger.finish(result, grid)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}))
    return result


#: points of this process's sweep that failed (a multirun goes on past them)
FAILED: list[str] = []


def record_failure(cfg: DictConfig, reason: str) -> None:
    """failed.json beside the point's other files: what was asked and why it stopped, under the names metrics.json
    uses (the method's own name, the scale it resolved to), so diffguide.report joins the two."""
    try:
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = OmegaConf.select(cfg, "guidance._target_", default="") or ""
        try:
            guidance_name = getattr(get_class(target), "name", None) or target.rsplit(".", 1)[-1]
        except Exception:
            guidance_name = target.rsplit(".", 1)[-1]
        try:
            scale = OmegaConf.select(cfg, "guidance.scale", default=None)
        except OmegaConfBaseException:
            scale = None
        failure = {"guidance": guidance_name, "scale": scale,
                   "sampler": (OmegaConf.select(cfg, "sampler._target_", default="") or "").rsplit(".", 1)[-1].lower(),
                   "steps": OmegaConf.select(cfg, "steps", default=None), "reason": reason,
                   "overrides": list(HydraConfig.get().overrides.task)}
        checkpoint.atomic_write_text(out_dir / "failed.json", json.dumps(failure, indent=2))
    except checkpoint.DiskFull:
        pass  # the error about to be printed is this very lack of space
    except Exception as exc:  # recording a failure must never hide the failure itself
        print(f"diffguide: could not write failed.json: {exc}", file=sys.stderr)


def _reason(exc: BaseException) -> str | None:
    """One line for an error the user can fix, None for a programming error."""
    if isinstance(exc, UserError):
        return str(exc).splitlines()[0]
    if isinstance(exc, (OmegaConfBaseException, InstantiationException)):
        return cli.describe(exc)  # a value the config gave that the target's constructor refused
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = exc.filename
        if where is None:
            try:
                where = HydraConfig.get().runtime.output_dir
            except Exception:  # Hydra had not set up the job yet
                where = cli.CHECKED.get("folder", "the output folder")
        return f"no space left on the device of {where}"
    return None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run(cfg)
    except KeyboardInterrupt:
        raise  # entry() says what was kept
    except Exception as exc:
        if _interrupted(exc):
            raise KeyboardInterrupt from None
        reason = _reason(exc)
        if reason is None:
            if not multirun:
                raise
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        return
    record_failure(cfg, reason)
    print(f"diffguide: error: {reason}", file=sys.stderr)
    if not multirun:
        sys.exit(2)  # SystemExit passes Hydra by; an exception would add its "Error executing job" line
    # In a sweep, one bad point is recorded and the others still run; the process exits non-zero at the end.
    FAILED.append(f"{HydraConfig.get().job.override_dirname or HydraConfig.get().runtime.output_dir}: {reason}")


def entry(argv: list[str] | None = None) -> int:
    """The command: check every point of the command line, then let Hydra run it; one line for any user error."""
    argv = sys.argv[1:] if argv is None else argv
    parser = get_args_parser()

    def refuse(message):
        raise UserError(f"{message} (usage: python -m diffguide.run [-m] key=value ...)")

    parser.error = refuse  # argparse would print its usage block and exit
    try:
        args = parser.parse_intermixed_args(argv)  # `-m` may stand anywhere, as users type it
    except UserError as exc:
        print(f"diffguide: error: {exc}", file=sys.stderr)
        return 2
    plain = not (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.config_path
                 or args.config_name or args.config_dir or args.experimental_rerun)
    if plain:
        problems = cli.precheck(args.overrides, args.multirun)
        for line in problems:
            print(f"diffguide: error: {line}", file=sys.stderr)
        if problems:
            return 2
        sys.argv = [sys.argv[0], *(["-m"] if args.multirun else []), *args.overrides]
    # Hydra's own reporting prints several lines; with HYDRA_FULL_ERROR its exceptions reach us instead.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except SystemExit:
        raise
    except BaseException as exc:
        if _interrupted(exc):
            print(f"interrupted: {Progress.kept()}; run the same command to resume", file=sys.stderr)
            return 130
        reason = _reason(exc) or (cli.describe(exc, args.overrides) if _from_config(exc) else None)
        if reason is None:
            raise
        print(f"diffguide: error: {reason}", file=sys.stderr)
        return 2
    if FAILED:
        print(f"diffguide: {len(FAILED)} point(s) of the sweep failed (failed.json in each):", file=sys.stderr)
        for line in FAILED:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def _interrupted(exc: BaseException) -> bool:
    """A Ctrl-C, also one that a library wrapped in its own error (Hydra's instantiate does, mid-import)."""
    return any(isinstance(e, KeyboardInterrupt) for e in cli.causes(exc))


def _from_config(exc: BaseException) -> bool:
    return isinstance(exc, (HydraException, OmegaConfBaseException))


if __name__ == "__main__":
    sys.exit(entry())
