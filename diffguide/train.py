"""Train the embedded networks: `python -m diffguide.train train=NAME [train.KEY=VALUE ...] [out_dir=F]` runs the
trainer that conf/train/NAME.yaml names by `_target_` (diffguide/training/: recipes.train_unet, train_dit,
train_evaluator, train_noisy_classifier; distill.train_guided_student, train_progressive; ppap.train_ppap).

The promises `python -m diffguide.run` keeps, kept here:
- The training's folder is named by its settings, `outputs/train/<name>-<digest>/` (or out_dir=): it holds the
  state every few steps (`training/resume.py`: weights, EMA, optimiser, step, every RNG), so a rerun of the same
  command resumes where a kill or a Ctrl-C stopped it, bit-identical to an uninterrupted run, and a rerun of a
  finished one trains nothing. The weights and their card land there when training ends.
- `train.out=F` (or `shipped`: the committed file in diffguide/weights) also writes the result to F. An existing F is
  replaced only with `train.overwrite=true`, and only by an atomic rename once training has ended: a kill never
  leaves a half-trained model in its place. Without it, nothing under version control is written.
- Every mistake in the config or the paths is one line on stderr and exit 2, before any step; a second training
  in the same folder stops with one line (a lock); Ctrl-C is one line (where the checkpoint is), exit 130.
"""

import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from diffguide.command import interrupt  # noqa: E402  (before the heavy imports below)

interrupt.install()

import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf, open_dict

from diffguide.command import checks, wrapper
from diffguide.errors import UserError
from diffguide.runtime.device import resolve_device, resolve_precision
from diffguide.store.atomic import atomic_write_bytes, atomic_write_text, clean_stale_temps
from diffguide.store.checkpoint import asset_path, file_digest
from diffguide.store.lock import FolderLock
from diffguide.training import resume
from diffguide.training.loop import write_card

CONFIG_NAME = "train"
USAGE = "usage: python -m diffguide.train train=NAME [train.KEY=VALUE ...] [out_dir=FOLDER] [device=auto|cpu|cuda]"
KEYS = ("train (the recipe: conf/train/*.yaml; train.steps, train.batch_size, train.out, train.overwrite, "
        "train.checkpoint_every, ...), device, out_dir")
RECORD = "train.json"
#: keys that change how a training is run or kept, not the network it makes (left out of the folder's digest)
NOT_SETTINGS = ("out", "overwrite", "log_every", "checkpoint_every")
#: whole-number keys of the recipes and their least values
WHOLE = {"steps": 1, "batch_size": 1, "log_every": 1, "checkpoint_every": 0, "warmup_steps": 0, "seed": 0,
         "num_classes": 1}


def resolve_trainer(tcfg: DictConfig):
    """The function train._target_ names; a missing one, one that cannot be imported or one that does not take a
    trainer's arguments (cfg, images, labels, device, test=, log=) is a UserError."""
    target = tcfg.get("_target_")
    if not target:
        raise UserError("train._target_ is missing: name the trainer, e.g. "
                        "train._target_=diffguide.training.recipes.train_unet")
    hydra_log = logging.getLogger("hydra.utils")  # get_method logs a failure over lines: the UserError is one line
    disabled, hydra_log.disabled = hydra_log.disabled, True
    try:
        trainer = get_method(str(target))
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"train._target_={target} cannot be imported: name a trainer such as "
                        f"diffguide.training.recipes.train_unet, train_evaluator or train_noisy_classifier") from None
    finally:
        hydra_log.disabled = disabled
    try:
        inspect.signature(trainer).bind(tcfg, None, None, None, test=None, log=print)
    except (TypeError, ValueError):
        raise UserError(f"train._target_={target} is not a trainer: a trainer takes "
                        f"(cfg, images, labels, device, test=None, log=print)") from None
    return trainer


def check(tcfg: DictConfig) -> None:
    """The recipe's values, before anything is built: one line for the first bad one."""
    for key, least in WHOLE.items():
        if key in tcfg:
            value = tcfg[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise UserError(f"train.{key}={value!r}: use a whole number >= {least}")
    for key in ("lr", "weight_decay", "ema_decay", "label_dropout"):
        if key in tcfg and (isinstance(tcfg[key], bool) or not isinstance(tcfg[key], (int, float))):
            raise UserError(f"train.{key}={tcfg[key]!r}: use a number")
    if not isinstance(tcfg.get("overwrite", False), bool):
        raise UserError(f"train.overwrite={tcfg.overwrite!r}: use true or false")
    if not tcfg.get("shipped"):
        raise UserError("train.shipped is missing: the recipe must name the file it makes "
                        "(e.g. shipped: fmnist_unet.safetensors)")
    if "precision" in tcfg:
        resolve_precision(tcfg.precision)


def products(tcfg: DictConfig, base: Path) -> list[tuple[Path, str | None]]:
    """The files a training writes, from `base` (a file, or for progressive distillation the prefix of one file per
    round), each with the key of its stats (None: the whole stats)."""
    if "rounds" in tcfg:
        from diffguide.training.distill import out_path

        return [(Path(out_path(str(base), int(s))), f"{int(s)}step") for s in tcfg.rounds]
    return [(Path(base), None)]


def settings_of(tcfg: DictConfig, device: torch.device) -> tuple[dict, str]:
    """What the trained network depends on (the resolved recipe but how it is kept, and the device's kind), and its
    digest."""
    settings = {k: v for k, v in OmegaConf.to_container(tcfg, resolve=True).items() if k not in NOT_SETTINGS}
    settings["device"] = device.type
    text = json.dumps(settings, sort_keys=True, default=str)
    return settings, hashlib.sha256(text.encode()).hexdigest()[:10]


def _destination(tcfg: DictConfig) -> Path | None:
    out = tcfg.get("out")
    if out is None:
        return None
    return Path(asset_path(str(tcfg.shipped))) if str(out) == "shipped" else Path(str(out))


def _check_destinations(tcfg: DictConfig, finished: list[Path] | None) -> list[tuple[Path, Path]]:
    """(made in the folder, to write at train.out) pairs; refuses a folder, an unwritable place, or an existing file
    without train.overwrite=true (unless it already holds this very training's result)."""
    dest = _destination(tcfg)
    if dest is None:
        return []
    pairs = []
    for made, _ in products(tcfg, Path(tcfg.shipped)):
        target = dest.parent / made.name.replace(Path(str(tcfg.shipped)).name, dest.name, 1)
        if target.is_dir():
            raise UserError(f"train.out={tcfg.out}: {target} is a folder; name a file, e.g. "
                            f"train.out={target / Path(str(tcfg.shipped)).name}")
        try:
            checks.check_writable(target.parent, "train.out")
        except UserError as exc:
            why = str(exc).rsplit(": ", 1)[-1]
            raise UserError(f"train.out={tcfg.out}: its folder {target.parent} cannot be written ({why})") from None
        if target.exists() and not tcfg.get("overwrite", False):
            same = finished is not None and any(f.name == made.name and file_digest(f, 64) == file_digest(target, 64)
                                                for f in finished)
            if not same:
                raise UserError(f"train.out: {target} exists; add train.overwrite=true to replace it (it is replaced "
                                f"only when the training has ended)")
        pairs.append((made, target))
    return pairs


def _record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / RECORD).read_text())
        return record if isinstance(record, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _install(folder: Path, pairs: list[tuple[Path, Path]], log) -> None:
    """Copy the folder's weights (and cards) to train.out's place, each by an atomic rename."""
    for made, target in pairs:
        for source, dest in ((folder / made.name, target), ((folder / made.name).with_suffix(".md"),
                                                             target.with_suffix(".md"))):
            atomic_write_bytes(dest, source.read_bytes())
        log(f"wrote {target} and {target.with_suffix('.md')}")


def _finished(folder: Path, made: list[Path]) -> tuple[dict | None, bool]:
    """The folder's record and whether it says a finished training whose products are all there."""
    record = _record(folder)
    return record, bool(record and record.get("finished")) and all(p.is_file() for p in made)


def train(cfg: DictConfig, log=print) -> dict:
    """The command once the config composed: check, lock, train (or resume, or find it done), write."""
    tcfg = cfg.train
    check(tcfg)
    device = resolve_device(cfg.device)
    trainer = resolve_trainer(tcfg)  # imports the recipe's libraries: after the checks that need none
    settings, digest = settings_of(tcfg, device)
    folder = Path(str(cfg.out_dir)) if cfg.out_dir is not None else \
        Path("outputs") / "train" / f"{tcfg.name}-{digest}"
    made = [folder / p.name for p, _ in products(tcfg, Path(str(tcfg.shipped)))]
    record, done = _finished(folder, made)
    if record is not None and record.get("digest") != digest:
        raise UserError(f"out_dir={folder} holds a training of other settings ({RECORD} names "
                        f"{record.get('settings', {}).get('name', 'another recipe')}, digest "
                        f"{record.get('digest')}); use another out_dir")
    pairs = _check_destinations(tcfg, made if done else None)
    checks.check_writable(folder, "out_dir" if cfg.out_dir is not None else "the output folder")
    with FolderLock(folder, "diffguide training", "out_dir"):
        record, done = _finished(folder, made)  # another process may have finished it meanwhile
        if done:
            log(f"already trained in {folder}: {', '.join(p.name for p in made)}")
            stats = record.get("stats", {})
        else:
            stats = _train(cfg, trainer, device, folder, settings, digest, made, log)
        _install(folder, pairs, log)
    return stats


def _train(cfg, trainer, device, folder: Path, settings: dict, digest: str, made: list[Path], log) -> dict:
    from diffguide.data import fashion_mnist

    tcfg = cfg.train
    staged = folder / "staged"
    for place in (folder, staged):
        if place.is_dir():
            clean_stale_temps(place)
    atomic_write_text(folder / RECORD, json.dumps({"digest": digest, "finished": False, "settings": settings},
                                                  indent=2, default=str))
    images, labels = fashion_mnist.load("train")
    test = fashion_mnist.load("test")
    run_cfg = tcfg.copy()
    with open_dict(run_cfg):
        run_cfg.out = str(staged / Path(str(tcfg.shipped)).name)
    state = resume.TrainingState(folder, tcfg.get("checkpoint_every", 0))
    try:
        with resume.active(state):
            _, stats = trainer(run_cfg, images, labels, device, test=test, log=log)
    except resume.Interrupted:
        raise
    except KeyboardInterrupt:
        raise state.interrupted() from None
    for (product, key), final in zip(products(tcfg, staged / Path(str(tcfg.shipped)).name), made):
        os.replace(product, final)
        write_card(tcfg, stats if key is None else stats[key], weights=final)
    atomic_write_text(folder / RECORD, json.dumps({"digest": digest, "finished": True, "settings": settings,
                                                   "stats": stats}, indent=2, default=str))
    state.clear()
    shutil.rmtree(staged, ignore_errors=True)
    print(json.dumps(stats))
    log(f"wrote {', '.join(str(p) for p in made)} (and their cards)")
    return stats


def entry(argv: list[str] | None = None) -> int:
    return wrapper.entry(argv, CONFIG_NAME, USAGE, KEYS, "", lambda cfg: train(cfg, log=_log), resolved=("train",))


def _log(line: str) -> None:
    print(line, flush=True)  # progress on stdout: stderr is for the one line of an error or an interruption


if __name__ == "__main__":
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
    sys.exit(entry())
