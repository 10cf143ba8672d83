"""`python -m diffguide.run [-m] key=value ...`: sample with a guidance method, then score the samples."""

import errno
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path


from diffguide.command import interrupt  # noqa: E402  (before the heavy imports below)

interrupt.install()

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra._internal.utils import get_args_parser
from hydra.errors import HydraException, InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from diffguide.data import prompts as prompt_lib
from diffguide.guidance.equivalent import EquivalentScaleProbe
from diffguide.models.text import is_text
from diffguide.store import checkpoint
from diffguide.command import checks
from diffguide.runtime import distributed, slurm
from diffguide.store import results
from diffguide.runtime.distributed import Shard
from diffguide.store.fingerprint import dependency_files, fingerprint
from diffguide.samplers.generate import generate, noise_levels
from diffguide.logging.base import NoLogger
from diffguide.metrics import intervals
from diffguide.command.config import CONF_DIR, register, validate
from diffguide.errors import FolderRefused, UserError, instantiate
from diffguide.runtime.device import resolve_device, resolve_precision
from diffguide.store.samples import SampleStore, run_digest

register()


class Progress:
    """What a Ctrl-C or a full disk reports: how many of the run's samples are on disk."""

    def __init__(self) -> None:
        self.store: SampleStore | None = None
        self.total = 0
        #: how to resume: the same command names its folder (out_dir=) or, by default, a new one by the clock
        self.resume = "run the same command to resume"

    def kept(self) -> str:
        if self.store is None:
            return "before sampling; nothing was written"
        return f"{len(self.store.existing() & set(range(self.total)))} of {self.total} samples kept in {self.store.dir}"


@dataclass
class Session:
    """What one command keeps over the points it runs (`entry` owns it): the points of its sweep that failed (a
    multirun goes on past them), and the progress a Ctrl-C reports."""

    failed: list[str] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)


def run(cfg: DictConfig, out_dir: Path | None = None, name: str | None = None, group: str | None = None,
        progress: Progress | None = None, record=None) -> dict:
    """One point: sample, then score. `out_dir`: its folder (Hydra's output_dir; by default `cfg.out_dir`, as a
    caller composing the config itself sets it); `name`: the job's name (by default the folder's); `group`: in a
    sweep, the sweep's name; `progress`: updated with what the run has on disk; `record(out_dir)`: called once the
    folder is this run's (locked, its settings checked), to write what Hydra would have written before the job."""
    total_start = time.perf_counter()
    validate(cfg)
    if out_dir is None and cfg.out_dir is None:
        raise ValueError("run() needs out_dir, or cfg.out_dir")
    out_dir = Path(cfg.out_dir if out_dir is None else out_dir)
    shard, device = distributed.setup(resolve_device(cfg.device))
    try:
        return _run(cfg, out_dir, out_dir.name if name is None else name, group, progress or Progress(), shard,
                    device, total_start, record)
    finally:
        distributed.teardown()


def _run(cfg: DictConfig, out_dir: Path, name: str, group: str | None, progress: Progress, shard: Shard,
         device: torch.device, total_start: float, record=None) -> dict:
    if shard.world > 1 and cfg.out_dir is None:
        raise UserError(f"a run over {shard.world} processes needs out_dir= (every rank must write to the same "
                        f"folder, and the default one is named by each process's clock)")
    dtype = resolve_precision(cfg.precision.value if hasattr(cfg.precision, "value") else cfg.precision)

    # Build and check everything before any long work: a bad config or a missing file fails here, as one line:
    # the libraries' warnings of this phase are shown only once it has passed.
    with warnings.catch_warnings(record=True) as caught:
        denoiser = instantiate(cfg.model).to(device)
        check_conditions(cfg, denoiser)
        denoiser.set_precision(dtype)
        sampler = instantiate(cfg.sampler)
        sampler.check(denoiser)
        guidance = instantiate(cfg.guidance)
        if cfg.get("equivalent_scale"):
            guidance = EquivalentScaleProbe(guidance)
        guidance.check(denoiser)
        sampler.check(denoiser, guidance)
        metric = instantiate(cfg.metric)
        metric.check(cfg.num_samples)
        settings, files = fingerprint(cfg)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for notice in getattr(denoiser, "notices", []):
        print(f"diffguide: warning: {notice}", file=sys.stderr)

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
    elif record is not None:
        record(out_dir)  # the folder is this run's now: Hydra's record of it may be written
    progress.store, progress.total = store, cfg.num_samples
    try:
        return _sample_and_score(cfg, out_dir, name, group, shard, device, total_start, denoiser, sampler, guidance,
                                 metric, store, settings["files"])
    finally:
        store.release()


def check_conditions(cfg: DictConfig, denoiser) -> None:
    """Prompts go to text-to-image models only; `prompts.images_per_prompt=k` makes num_samples P * k."""
    if not is_text(denoiser):
        if prompt_lib.given(cfg.get("prompts")):
            raise UserError(f"prompts are the conditions of a text-to-image model (model=sd15, sd21, sdxl, sd3, "
                            f"flux_dev, flux_schnell, pixart_sigma); model={_model_name(cfg)} is class-conditional: "
                            f"leave prompts out")
        return
    per_prompt = cfg.prompts.get("images_per_prompt") if cfg.get("prompts") is not None else None
    if per_prompt is not None:
        if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
            raise UserError(f"prompts.images_per_prompt must be a whole number >= 1, or null (num_samples images, "
                            f"prompt i mod P for sample i) (got {per_prompt!r})")
        with open_dict(cfg):
            cfg.num_samples = len(denoiser.prompt_set) * per_prompt


def _model_name(cfg: DictConfig) -> str:
    target = str(cfg.model.get("_target_", "")) if cfg.get("model") is not None else ""
    try:
        return HydraConfig.get().runtime.choices.get("model", target)
    except ValueError:
        return target.rsplit(".", 2)[-2] if "." in target else target or "?"


def _sample_and_score(cfg, out_dir, name, group, shard, device, total_start, denoiser, sampler, guidance, metric,
                      store, file_digests: dict[str, str]) -> dict:
    logger = instantiate(cfg.logger) if shard.main else NoLogger()
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if shard.main:
        checkpoint.atomic_write_text(out_dir / "config.resolved.yaml", OmegaConf.to_yaml(resolved))
    logger.start(resolved, out_dir, name, group)
    try:
        sampling = generate(denoiser, sampler, guidance, store, device, logger, num_samples=cfg.num_samples,
                            batch_size=cfg.batch_size, seed=cfg.seed, shard=shard,
                            attempts=results.Attempts(out_dir, shard.rank))
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
        # features.npz: the per-sample statistics the report's paired differences resample (no network again)
        scores = metric(store.dir, [m["label"] for m in metas], device, stats_path=out_dir / "features.npz",
                        prompts=[m["prompt"] for m in metas] if is_text(denoiser) else None)
        metric_files = dependency_files(resolved["metric"], "metric") if isinstance(resolved["metric"], dict) else {}
        result = {**results.point(guidance.name, guidance.scale, sampler.name, cfg.steps), **scores,
                  "nfe": sum(m["nfe"] for m in metas) / len(metas), "num_samples": cfg.num_samples, **sampling,
                  **results.sampling_totals(out_dir),
                  "noise_levels": noise_levels(sampler, denoiser),
                  **({"equivalent_scale": guidance.summary()} if isinstance(guidance, EquivalentScaleProbe) else {}),
                  **({"prompt_set": {"source": denoiser.prompt_set.source, "prompts": len(denoiser.prompt_set),
                                     "digest": denoiser.prompt_set.digest}} if is_text(denoiser) else {}),
                  "scoring_wall_s": round(time.perf_counter() - score_start, 3),
                  "wall_time_s": round(time.perf_counter() - total_start, 3), "device": str(device),
                  "files_sha256": {**file_digests,
                                   **{k: checkpoint.path_digest(p) for k, p in metric_files.items()}},
                  "config": resolved}
        results.write_metrics(out_dir, result)
    except BaseException:
        logger.finish({}, None)
        raise
    logger.finish(result, grid)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}))
    return result


def _reason(exc: BaseException, folder: str) -> str | None:
    """One line for an error the user can fix, None for a programming error. `folder`: the output folder, named when
    the disk filled up and the error does not say where."""
    if isinstance(exc, UserError):
        return str(exc).splitlines()[0]
    if isinstance(exc, (OmegaConfBaseException, InstantiationException)):
        return checks.describe(exc)  # a value the config gave that the target's constructor refused
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device of {folder if exc.filename is None else exc.filename}"
    if type(exc).__module__.startswith("submitit"):  # sbatch's refusal, a job lost by the cluster: their last line
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        said = next((line for line in lines if line.startswith(("sbatch:", "srun:", "error"))), None)
        return f"Slurm: {said or (lines[0] if lines else type(exc).__name__)}"
    return None


def objective(result: dict, tune: DictConfig) -> float:
    """What a scale search minimises for a finished point: `tune.metric` (default: the first fid_* in the result),
    plus 100 x the shortfall below `tune.min_class_accuracy` where one is set (0.01 short adds 1 to FID: a point
    under the floor loses to every point above it with a FID within that margin). NaN when the point has no such
    metric (Optuna then records the trial as failed)."""
    name = tune.metric or next((k for k in sorted(result) if intervals.is_column("fid", k)), None)
    value = result.get(name) if name else None
    if not isinstance(value, (int, float)):
        return math.nan
    floor = tune.min_class_accuracy
    if floor is not None:
        accuracy = result.get("class_accuracy")
        if accuracy is None:
            return math.nan
        value += 100.0 * max(0.0, floor - accuracy)
    return float(value)


def hydra_record(folder: Path, cfg: DictConfig, hc) -> None:
    """What Hydra writes into a job's folder before the job (`.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`),
    written once the folder is the run's: conf/config.yaml sets hydra.output_subdir to null, so that a run refused
    in a folder (held by another run, or holding other settings) leaves that folder's record as it was."""
    record = Path(folder) / ".hydra"
    checkpoint.atomic_write_text(record / "config.yaml", OmegaConf.to_yaml(cfg))
    checkpoint.atomic_write_text(record / "hydra.yaml", OmegaConf.to_yaml({"hydra": hc}))
    checkpoint.atomic_write_text(record / "overrides.yaml", OmegaConf.to_yaml(list(hc.overrides.task)))


def main(cfg: DictConfig, session: Session) -> float:
    """The task Hydra runs for the point (or for each point of a sweep); the only reader of Hydra's view of the job.
    Returns the point's objective (see `objective`), NaN for a point that failed."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    out_dir = Path(hc.runtime.output_dir)
    if cfg.out_dir is None:  # the default folder is named by the clock: the same command would start a new one
        session.progress.resume = f"add out_dir={hc.sweep.dir if multirun else out_dir} to the same command to resume"
    try:
        result = run(cfg, out_dir, out_dir.name, Path(hc.sweep.dir).name if multirun else None, session.progress,
                     record=lambda folder: hydra_record(folder, cfg, hc))
    except KeyboardInterrupt:
        raise  # entry() says what was kept
    except Exception as exc:
        if _interrupted(exc):
            raise KeyboardInterrupt from None
        reason = _reason(exc, hc.runtime.output_dir)
        if reason is None:
            if not multirun:
                raise
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        refused = isinstance(exc, FolderRefused)
    else:
        return objective(result, cfg.tune)
    if not refused:  # a folder that is not this run's is left as it was
        results.record_failure(out_dir, cfg, reason, list(hc.overrides.task))
    print(f"diffguide: error: {reason}", file=sys.stderr)
    if not multirun:
        sys.exit(2)  # SystemExit passes Hydra by; an exception would add its "Error executing job" line
    # In a sweep, one bad point is recorded and the others still run; the process exits non-zero at the end.
    session.failed.append(f"{hc.job.override_dirname or hc.runtime.output_dir}: {reason}")
    return math.nan


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
    if args.experimental_rerun:
        # Hydra's rerun unpickles the file it is given: a planted pickle would run code
        print("diffguide: error: --experimental-rerun is refused: it loads a pickle, which can run any code; rerun "
              "a point with its own overrides (its folder's .hydra/overrides.yaml)", file=sys.stderr)
        return 2
    folder = None  # the output folder the checks found, named if the disk fills up before Hydra has set up the job
    plain = not (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.config_path
                 or args.config_name or args.config_dir or args.experimental_rerun)
    if plain:
        problems, folder = checks.precheck(args.overrides, args.multirun)
        for line in problems:
            print(f"diffguide: error: {line}", file=sys.stderr)
        if problems:
            return 2
        sys.argv = [sys.argv[0], *(["-m"] if args.multirun else []), *args.overrides]
    if any(o.replace(" ", "") in ("hydra/launcher=slurm", "hydra/launcher=slurm_cpu") for o in args.overrides):
        slurm.prepare_launch()
    # Hydra's own reporting prints several lines; with HYDRA_FULL_ERROR its exceptions reach us instead.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    session = Session()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def task(cfg: DictConfig) -> float:
        return main(cfg, session)  # a sweeper that optimises (hydra/sweeper=tune) minimises this

    try:
        task()
    except SystemExit:
        raise
    except BaseException as exc:
        if _interrupted(exc):
            print(f"interrupted: {session.progress.kept()}; {session.progress.resume}", file=sys.stderr)
            return 130
        reason = _reason(exc, folder or "the output folder") or (checks.describe(exc, args.overrides)
                                                                  if _from_config(exc) else None)
        if reason is None:
            raise
        print(f"diffguide: error: {reason}", file=sys.stderr)
        return 2
    if session.failed:
        print(f"diffguide: {len(session.failed)} point(s) of the sweep failed ({results.FAILED} in each):",
              file=sys.stderr)
        for line in session.failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def _interrupted(exc: BaseException) -> bool:
    """A Ctrl-C, also one that a library wrapped in its own error (Hydra's instantiate does, mid-import)."""
    return any(isinstance(e, KeyboardInterrupt) for e in checks.causes(exc))


def _from_config(exc: BaseException) -> bool:
    return isinstance(exc, (HydraException, OmegaConfBaseException))


if __name__ == "__main__":
    sys.exit(entry())
