"""The results of a long command, batch by batch (`python -m diffguide.classify`, `python -m diffguide.edit`): each
batch's tensors written atomically into `FOLDER/parts/` as soon as they are made, so that a rerun after a kill or a
Ctrl-C keeps them and does only the rest.

`FOLDER/parts/settings.json` names what they were made with; a folder holding parts of other settings is refused
(`FolderRefused`, naming what differs), as a run refuses samples of other settings. One process at a time holds the
folder (`store.lock.FolderLock`). Parts are torch.save'd dicts of tensors and numbers, read back with
`weights_only=True`: nothing in them is unpickled as code; a damaged part is made again."""

import io
import json
from pathlib import Path

import torch

from diffguide.errors import FolderRefused
from diffguide.store.atomic import atomic_write_bytes, atomic_write_text, clean_stale_temps
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

    def claim(self) -> int:
        """Hold the folder and check its parts are of these settings; returns how many it keeps."""
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
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, value: dict) -> None:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        atomic_write_bytes(self.dir / f"{key}.pt", buffer.getvalue())


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
