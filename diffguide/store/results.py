"""A point's results on disk: metrics.json when it finished, failed.json when it stopped with an error.

Both name the point the same way (the guidance method's own name, the scale it resolved to, the sampler and its
steps), so that diffguide.report joins them; everything that writes or reads them goes through this module.
"""

import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffguide.store.atomic import DiskFull, atomic_write_text

METRICS = "metrics.json"
FAILED = "failed.json"


def point(guidance: str, scale, sampler: str, steps) -> dict:
    """The columns metrics.json and failed.json share: the method's name, its resolved scale, the sampler, steps."""
    return {"guidance": guidance, "scale": scale, "sampler": sampler, "steps": steps}


def write_metrics(out_dir: Path, result: dict) -> None:
    """metrics.json of a finished point; a failed.json of an earlier attempt goes, as it is no longer true."""
    atomic_write_text(Path(out_dir) / METRICS, json.dumps(result, indent=2))
    (Path(out_dir) / FAILED).unlink(missing_ok=True)


def _failure(cfg: DictConfig, reason: str, overrides: list[str]) -> dict:
    """What a point asked for (read from its config: its objects may never have been made) and why it stopped."""
    target = OmegaConf.select(cfg, "guidance._target_", default="") or ""
    try:
        guidance_name = getattr(get_class(target), "name", None) or target.rsplit(".", 1)[-1]
    except Exception:
        guidance_name = target.rsplit(".", 1)[-1]
    try:
        scale = OmegaConf.select(cfg, "guidance.scale", default=None)
    except OmegaConfBaseException:
        scale = None
    sampler = (OmegaConf.select(cfg, "sampler._target_", default="") or "").rsplit(".", 1)[-1].lower()
    return {**point(guidance_name, scale, sampler, OmegaConf.select(cfg, "steps", default=None)), "reason": reason,
            "overrides": list(overrides)}


def record_failure(out_dir: Path, cfg: DictConfig, reason: str, overrides: list[str]) -> None:
    """failed.json in the point's folder `out_dir`: what was asked (`cfg`, the command's `overrides` for the point)
    and why it stopped. Never raises: recording a failure must not hide the failure itself."""
    try:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / FAILED, json.dumps(_failure(cfg, reason, overrides), indent=2))
    except DiskFull:
        pass  # the error about to be printed is this very lack of space
    except Exception as exc:
        print(f"diffguide: could not write {FAILED}: {exc}", file=sys.stderr)


#: every attempt's sampling in a point's folder: one entry per process and attempt, rewritten after each batch
ATTEMPTS = "attempts.json"


class Attempts:
    """The images and seconds one attempt (this process) has spent on a point's samples so far, kept in the folder's
    attempts file (rank r of a multi-process run: attempts.rank{r}.json) after every batch, so that a run killed
    midway still counts in the totals of the run that resumes it. The first attempt of a folder made before the
    file existed starts it from the totals its metrics.json recorded."""

    def __init__(self, out_dir: Path, rank: int = 0):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / (ATTEMPTS if rank == 0 else f"attempts.rank{rank}.json")
        self.key = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {socket.gethostname()} pid {os.getpid()} " \
                   f"{secrets.token_hex(3)}"
        self._entries: dict | None = None  # the file as this attempt found it, read once (the folder is locked)

    def record(self, images: int, seconds: float) -> None:
        if self._entries is None:
            self._entries = _entries(self.path)
            if not self._entries and self.path.name == ATTEMPTS:
                before = _metrics_totals(self.out_dir)
                if before is not None:
                    self._entries["before this file"] = before
        self._entries[self.key] = {"images": int(images), "seconds": round(float(seconds), 3)}
        atomic_write_text(self.path, json.dumps(self._entries, indent=1))


def _entries(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict) and isinstance(v.get("images"), int)
            and isinstance(v.get("seconds"), (int, float))}


def _metrics_totals(out_dir: Path) -> dict | None:
    try:
        before = json.loads((Path(out_dir) / METRICS).read_text())
        return {"images": int(before.get("images_generated_total", before.get("images_generated")) or 0),
                "seconds": float(before.get("sampling_wall_s_total", before.get("sampling_wall_s")) or 0.0)}
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def sampling_totals(out_dir: Path) -> dict:
    """The images the point's folder holds were made over one attempt or several (killed and resumed, or grown to
    more samples): the seconds and images of every attempt (every process's attempts file), and the seconds per
    image they give."""
    seconds, images = 0.0, 0
    for path in sorted(Path(out_dir).glob("attempts*.json")):
        for entry in _entries(path).values():
            seconds += float(entry["seconds"])
            images += int(entry["images"])
    return {"sampling_wall_s_total": round(seconds, 3), "images_generated_total": images,
            "sampling_s_per_image": round(seconds / images, 4) if images else None}


@dataclass
class Recorded:
    """One point's results: its folder, "done" (metrics.json) or "failed" (failed.json), and what the file holds."""

    folder: Path
    status: str
    record: dict


#: the columns both files name a point by, and the types each may hold
_COLUMN_TYPES = {"guidance": (str,), "scale": (int, float, type(None)), "sampler": (str, type(None)),
                 "steps": (int, type(None)), "seed": (int, type(None)), "num_samples": (int, type(None)),
                 "nfe": (int, float, type(None)), "reason": (str,)}


_TYPE_NAMES = {str: "a string", int: "a whole number", float: "a number", type(None): "null"}


def problem(record) -> str | None:
    """Why a metrics.json or failed.json's content cannot be reported (None: it can): not an object, no method's
    name, or a column that names the point holding the wrong type."""
    if not isinstance(record, dict):
        return f"holds {type(record).__name__ if record is not None else 'null'}, not an object"
    if "guidance" not in record:
        return "names no guidance method"
    for key, types in _COLUMN_TYPES.items():
        value = record.get(key)
        if key in record and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            return f"its {key} is {json.dumps(value)[:40]}, not {' or '.join(_TYPE_NAMES[t] for t in types)}"
    return None


@dataclass
class Skipped:
    """A result file that could not be read: its path and why."""

    path: Path
    why: str


def read(root: Path, skip: frozenset[str] = frozenset()) -> tuple[list[Recorded], list[Skipped]]:
    """Every point recorded under `root` (a sweep, or one run): each metrics.json, then each failed.json whose point
    did not finish on a later attempt, in path order; folders named in `skip` (below `root`) are not looked into.
    A file that is damaged, unreadable or not a point's record is returned among the skipped, with why."""

    def found(name: str) -> list[Path]:
        return [p for p in sorted(Path(root).rglob(name)) if not skip & set(p.relative_to(root).parts)]

    records, skipped = [], []

    def load(path: Path, status: str) -> None:
        try:
            record = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"not JSON ({type(exc).__name__})"
            skipped.append(Skipped(path, why))
            return
        reason = problem(record)
        if reason is not None:
            skipped.append(Skipped(path, reason))
        else:
            records.append(Recorded(path.parent, status, record))

    for path in found(METRICS):
        load(path, "done")
    for path in found(FAILED):
        if not (path.parent / METRICS).exists():
            load(path, "failed")
    return records, skipped
