"""Samples on disk: per-sample seeds, atomic PNG files with their metadata, resumption and its safety check.

Sample i starts from noise drawn with seed `seed + i` and keeps its own generator for any later noise, so an image
depends on neither the batch size nor the split of the work, and a rerun can make exactly the missing ones.
"""

import csv
import io
import hashlib
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from diffguide.store.checkpoint import atomic_write_bytes, atomic_write_text, clean_stale_temps
from diffguide.errors import FolderRefused
from diffguide.store.lock import FolderLock

_NAME = re.compile(r"^(\d{6,})\.png$")
META_KEY = "diffguide"


def initial_noise(indices: Sequence[int], seed: int, shape: Sequence[int],
                  device: torch.device) -> tuple[torch.Tensor, list[torch.Generator]]:
    generators = [torch.Generator().manual_seed(seed + i) for i in indices]
    x_T = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
    return x_T.to(device), generators


def labels_for(indices: Sequence[int], num_classes: int) -> torch.Tensor:
    """Class i mod num_classes: every class equally often, whatever subset of indices is made."""
    return torch.tensor([i % max(num_classes, 1) for i in indices], dtype=torch.long)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> the same layout in uint8, rounding to the nearest level (as a saved sample is)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounding to the nearest level."""
    return quantize(images).permute(0, 2, 3, 1).cpu().numpy()


def tile_png(tiles, cols: int) -> bytes:
    """Tiles (each H x W x C uint8, C 1 or 3) row-major in `cols` columns with 2-pixel white borders, as a PNG."""
    h, w, c = tiles[0].shape
    rows = (len(tiles) + cols - 1) // cols
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, col = divmod(k, cols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = tile
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(buf, format="PNG")
    return buf.getvalue()


def encode_png(pixels: np.ndarray, meta: dict) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(META_KEY, json.dumps(meta, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_meta(path: Path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text[META_KEY])


def _try_meta(path: Path) -> dict | None:
    try:
        return read_meta(path)
    except Exception:  # a damaged file has no metadata to offer, whatever PIL raises
        return None


def run_digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def same_files_moved(previous: dict, current: dict) -> bool:
    """Whether two fingerprints differ only in where their files are: every file has the same content digest, and
    with the paths of those files set aside the settings are equal (a moved checkout, the same weights under another
    mount point on a cluster node)."""
    if not isinstance(previous, dict) or previous.get("files") != current.get("files"):
        return False

    def without_paths(fp: dict) -> dict:
        fp = json.loads(json.dumps(fp))
        for key in fp.get("files", {}):
            *parents, last = key.split(".")
            node = fp
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node.get(part) if isinstance(node, dict) \
                    else None
            if isinstance(node, dict) and last in node:
                node[last] = "<file>"
            elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
                node[int(last)] = "<file>"
        return fp

    return without_paths(previous) == without_paths(current)


def _flatten(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    flat = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _settings_differ(out_dir: Path, previous: dict, fingerprint: dict, files: dict[str, str]) -> str:
    old, new = _flatten({k: v for k, v in previous.items() if k != "files"}), \
        _flatten({k: v for k, v in fingerprint.items() if k != "files"})
    changed = [f"{k.rsplit('.', 1)[0]}'s code was corrected since those samples were made (revision "
               f"{old.get(k, 0)} there, {new.get(k, 0)} now)" if k.endswith("._revision") else
               f"{k}: {old.get(k, '(unset)')} there, {new.get(k, '(unset)')} now" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]
    old_files, new_files = previous.get("files") or {}, fingerprint.get("files") or {}
    changed += [f"{k} ({files.get(k, 'a file')}) changed since those samples were made" for k in sorted(set(old_files) & set(new_files))
                if old_files[k] != new_files[k]]
    changed += [f"{k}: not recorded there" for k in sorted(set(new_files) - set(old_files)) if k not in old]
    if not changed:
        changed = ["the recorded settings"]
    return (f"{out_dir} holds samples made with other settings ({'; '.join(changed[:3])}"
            f"{'; ...' if len(changed) > 3 else ''}); use another out_dir, or delete that folder to start over")


def sample_path(folder: Path, index: int) -> Path:
    """Sample `index`'s PNG in a samples folder (`SampleStore.dir`): the one naming every reader of samples uses."""
    return Path(folder) / f"{index:06d}.png"


class SampleStore:
    """`out_dir/samples/{i:06d}.png`, plus `out_dir/sampling.json`, the settings the images were made with.

    Every PNG carries its index, seed, label and the digest of those settings (`run`), so a resumed run can tell a
    sample of this experiment from a damaged file or one of another run, and can rebuild a lost sampling.json."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / "samples"
        self.fingerprint_path = self.out_dir / "sampling.json"
        self._lock = FolderLock(self.out_dir)
        self.lock_path = self._lock.path
        #: the digest of the settings (`claim`), written into every sample's metadata
        self.run_id: str | None = None

    def path(self, index: int) -> Path:
        return self.dir / f"{index:06d}.png"

    def lock(self) -> None:
        """Hold the run folder for this process until `release` (store.lock.FolderLock: a killed run never leaves
        it stuck); a second run on the same folder stops with one line that names the holder; the ranks of one
        multi-process run share the lock their rank 0 took."""
        self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def clean(self) -> int:
        """Remove the temp files a killed run left in the run folder and in samples/ (only dead writers')."""
        return sum(clean_stale_temps(folder) for folder in (self.out_dir, self.dir) if folder.is_dir())

    def claim(self, fingerprint: dict, files: dict[str, str] | None = None) -> str:
        """Record what the samples are made with (sampling.json) and return its digest, the `run` every sample
        carries; refuse to mix samples of other settings. `files`: config key -> path of the files the images depend
        on, to name the one that changed. A folder without samples accepts new settings (a run that diverged before
        writing anything can be rerun with another scale in the same out_dir)."""
        run_id = run_digest(fingerprint)
        text = json.dumps(fingerprint, indent=2, sort_keys=True)
        previous = None
        if self.fingerprint_path.is_file():
            try:
                previous = json.loads(self.fingerprint_path.read_text())
            except (ValueError, UnicodeDecodeError):
                previous = "damaged"
        have_samples = any(self.path(i).is_file() for i in self.existing())
        if previous == fingerprint or not have_samples:
            if previous != fingerprint:
                atomic_write_text(self.fingerprint_path, text)
            self.dir.mkdir(parents=True, exist_ok=True)
            return run_id
        if isinstance(previous, dict) and same_files_moved(previous, fingerprint):
            # the same files elsewhere: the samples are this run's; they keep the run id they were made under
            self.dir.mkdir(parents=True, exist_ok=True)
            return run_digest(previous)
        if isinstance(previous, dict):
            raise FolderRefused(_settings_differ(self.out_dir, previous, fingerprint, files or {}))
        # sampling.json is gone or damaged: the samples say which run made them (damaged ones are remade later)
        runs = {meta.get("run") for meta in map(_try_meta, self.dir.glob("*.png")) if meta is not None}
        what = "is damaged" if previous == "damaged" else "is missing"
        if runs != {run_id}:
            raise FolderRefused(f"{self.fingerprint_path} {what} and the samples in {self.dir} were not all made with "
                            f"these settings; use another out_dir, or delete that folder to start over")
        atomic_write_text(self.fingerprint_path, text)
        print(f"diffguide: warning: {self.fingerprint_path} {what}; rebuilt it from the samples, which were all "
              f"made with these settings", file=sys.stderr)
        return run_id

    def verify(self, num_samples: int, image_shape: Sequence[int], seed: int, num_classes: int,
               run_id: str) -> list[str]:
        """Check every existing sample a run of `num_samples` uses: it decodes, has the model's image size and
        channels, and its metadata is this index's (index, seed, label, run). Bad ones are deleted, so that they are
        made again; returns what was wrong with each."""
        indices = sorted(i for i in self.existing() if i < num_samples)
        expected = (image_shape[-1], image_shape[-2]), {1: "L", 3: "RGB"}.get(image_shape[0])

        for i in indices:
            if not self.path(i).is_file():  # a folder or a device under a sample's name: not ours to delete
                raise FolderRefused(f"{self.path(i)} is not a file; move it out of {self.dir} and run again")

        labels = dict(zip(indices, labels_for(indices, num_classes).tolist()))

        def problem(i: int) -> str | None:
            try:
                with Image.open(self.path(i)) as img:
                    img.load()
                    size, mode, text = img.size, img.mode, img.text.get(META_KEY)
            except Exception as exc:  # PIL raises many types for damaged files; each means "make it again"
                return f"{self.path(i).name}: not a whole PNG ({type(exc).__name__})"
            if (size, mode) != expected:
                return f"{self.path(i).name}: {mode} {size[0]}x{size[1]}, not {expected[1]} {expected[0][0]}x{expected[0][1]}"
            try:
                meta = json.loads(text)
            except (TypeError, ValueError):
                return f"{self.path(i).name}: no diffguide metadata"
            want = {"index": i, "seed": seed + i, "label": labels[i]}
            if any(meta.get(k) != v for k, v in want.items()):
                return f"{self.path(i).name}: made as sample {meta.get('index')} (seed {meta.get('seed')})"
            if meta.get("run", run_id) != run_id:
                return f"{self.path(i).name}: made by a run with other settings"
            return None

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # zlib releases the GIL
            bad = [(i, p) for i, p in zip(indices, pool.map(problem, indices)) if p]
        for i, _ in bad:
            self.path(i).unlink(missing_ok=True)
        problems = [p for _, p in bad]
        return problems

    def existing(self) -> set[int]:
        if not self.dir.is_dir():
            return set()
        return {int(m.group(1)) for p in self.dir.iterdir() if (m := _NAME.match(p.name))}

    def missing(self, num_samples: int) -> list[int]:
        done = self.existing()
        return [i for i in range(num_samples) if i not in done]

    def write(self, index: int, pixels: np.ndarray, meta: dict) -> None:
        atomic_write_bytes(self.path(index), encode_png(pixels, {"index": index, **meta}))

    def metadata(self, num_samples: int) -> list[dict]:
        return [read_meta(self.path(i)) for i in range(num_samples)]

    def write_labels(self, metas: Iterable[dict]) -> Path:
        """labels.csv: each sample's index, label (a class, or a prompt's index in the set), seed and network
        evaluations, and for a text model its prompt and negative prompt (quoted as CSV needs)."""
        metas = list(metas)
        text = any("prompt" in m for m in metas)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["index", "label", "seed", "nfe"] + (["prompt", "negative_prompt"] if text else []))
        for m in metas:
            row = [m["index"], m.get("label", ""), m["seed"], f"{m['nfe']:g}"]
            writer.writerow(row + ([m.get("prompt", ""), m.get("negative_prompt") or ""] if text else []))
        path = self.out_dir / "labels.csv"
        atomic_write_text(path, out.getvalue())
        return path

    def write_grid(self, count: int) -> Path | None:
        """The first `count` samples in a square grid, `grid.png`."""
        count = min(count, len(self.existing()))
        if count < 1:
            return None
        cols = int(np.ceil(np.sqrt(count)))
        tiles = [np.array(Image.open(self.path(i)).convert("RGB")) for i in range(count)]
        path = self.out_dir / "grid.png"
        atomic_write_bytes(path, tile_png(tiles, cols))
        return path
