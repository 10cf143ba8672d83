"""The results of a long command, batch by batch (`python -m diffguide.classify`, `python -m diffguide.edit`): each
batch's tensors written atomically into `FOLDER/parts/` as soon as they are made, so that a rerun after a kill or a
Ctrl-C keeps them and does only the rest.

`FOLDER/parts/settings.json` names what they were made with; a folder holding parts of other settings is refused
(`FolderRefused`, naming what differs), as a run refuses samples of other settings. One process at a time holds the
folder (`store.lock.FolderLock`). Parts are `checkpoint.save_state` files, read back without unpickling code; a
damaged part is made again."""

import json
import sys
import time
from pathlib import Path

from diffguide.errors import FolderRefused, Interrupted
from diffguide.store.atomic import atomic_write_text, clean_stale_temps
from diffguide.store.checkpoint import load_state, save_state
from diffguide.store.lock import FolderLock


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


class Partials:
    def __init__(self, folder: Path, settings: dict, what: str):
        self.folder = Path(folder)
        self.dir = self.folder / "parts"
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        self.lock = FolderLock(self.folder, what)

    def claim(self, noun: str) -> int:
        """Hold the folder and check its parts are of these settings; returns how many it keeps (and says so on
        stderr, as batches of `noun`, when it keeps any)."""
        self.lock.acquire()
        try:
            path = self.dir / "settings.json"
            try:
                previous = json.loads(path.read_text()) if path.is_file() else None
            except (OSError, ValueError):
                previous = "damaged"
            kept = self.keys()
            if previous != self.settings and kept:
                if isinstance(previous, dict):
                    was, now = _flat(previous), _flat(self.settings)
                    differ = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
                    what = ", ".join(f"{k}: {json.dumps(was.get(k))} there, {json.dumps(now.get(k))} now"
                                     for k in differ[:2])
                else:
                    what = f"{path} is {'damaged' if previous else 'missing'}"
                raise FolderRefused(f"{self.folder} holds {len(kept)} batch(es) of results made with other settings "
                                    f"({what}); use another out_dir, or delete {self.dir} to start over")
            self.dir.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(self.dir)
            if previous != self.settings:
                atomic_write_text(path, json.dumps(self.settings, indent=2, sort_keys=True))
            if kept:
                print(f"diffguide: resuming: {len(kept)} batch(es) of {noun} kept in {self.dir}", file=sys.stderr)
            return len(kept)
        except BaseException:
            self.lock.release()
            raise

    def release(self) -> None:
        self.lock.release()

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.pt")) if self.dir.is_dir() else []

    def get(self, key: str) -> dict | None:
        """The part `key`, or None where it is missing or damaged (then it is made again)."""
        path = self.dir / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            return load_state(path)
        except Exception:
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, value: dict) -> None:
        save_state(self.dir / f"{key}.pt", value)

    def each_batch(self, total: int, size: int, make, verb: str, hint: str, progress=None) -> list[dict]:
        """Every batch's part, in order, for images 0..total-1 `size` at a time: a kept one read back, the others
        made by `make(begin, end)` (a dict of tensors and numbers; its `seconds` added) and kept as soon as made.
        `progress(n)` after each batch of n images. A Ctrl-C raises `Interrupted`, saying how many images are
        `verb` and kept, and `hint` (how to resume)."""
        parts, finished = [], 0
        try:
            for begin in range(0, total, size):
                end = min(begin + size, total)
                key = f"{begin:07d}-{end:07d}"
                part = self.get(key)
                if part is None:
                    began = time.perf_counter()
                    part = make(begin, end)
                    part["seconds"] = time.perf_counter() - began
                    self.put(key, part)
                parts.append(part)
                finished = end
                if progress is not None:
                    progress(end - begin)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: {finished} of {total} images {verb} and kept in {self.dir}; "
                              f"{hint}") from None
        return parts


def settings_of(resolved: dict, leave_out: tuple[str, ...] = ("out_dir", "device", "grid_size")) -> dict:
    """What a command's results depend on: its resolved config but the keys that change where or how fast it runs
    (`leave_out`), with the content digest of every file the config names (weights, an evaluator)."""
    from diffguide.store.checkpoint import path_digest
    from diffguide.store.fingerprint import dependency_files

    kept = {k: v for k, v in resolved.items() if k not in leave_out and k != "hydra"}
    return {"settings": kept, "files": {key: path_digest(path) for key, path in sorted(
        dependency_files(kept, "cfg").items())}}


def resume_hint(folder: Path, explicit: bool) -> str:
    """How a rerun finds these parts: the same command where out_dir= names the folder, else that out_dir added
    (the default folder is named by the clock)."""
    return "run the same command to resume" if explicit else f"add out_dir={folder} to the same command to resume"
