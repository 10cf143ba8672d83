"""Samples on disk: per-sample seeds, atomic PNG files with their metadata, resumption and its safety check.

Sample i starts from noise drawn with seed `seed + i` and keeps its own generator for any later noise, so an image
depends on neither the batch size nor the split of the work, and a rerun can make exactly the missing ones.
"""

import io
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from diffguide.checkpoint import atomic_write_bytes, atomic_write_text
from diffguide.errors import UserError

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


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounding to the nearest level."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def encode_png(pixels: np.ndarray, meta: dict) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(META_KEY, json.dumps(meta, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_meta(path: Path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text[META_KEY])


class SampleStore:
    """`out_dir/samples/{i:06d}.png`, plus `out_dir/sampling.json`, the settings the images were made with."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / "samples"
        self.fingerprint_path = self.out_dir / "sampling.json"

    def path(self, index: int) -> Path:
        return self.dir / f"{index:06d}.png"

    def claim(self, fingerprint: dict, clean: bool = True) -> None:
        """Record what the samples are made with; refuse to mix them with samples of other settings. clean: delete
        the temp files a killed run left (only one process of a multi-process run may, before any writes)."""
        if self.fingerprint_path.is_file():
            previous = json.loads(self.fingerprint_path.read_text())
            if previous != fingerprint:
                keys = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
                raise UserError(f"{self.out_dir} already holds samples made with other settings ({', '.join(keys)} "
                                f"differ); use another out_dir, or delete that folder to start over")
        elif self.existing():
            raise UserError(f"{self.dir} holds samples but no sampling.json to say how they were made; "
                            f"use another out_dir")
        else:
            atomic_write_text(self.fingerprint_path, json.dumps(fingerprint, indent=2, sort_keys=True))
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.dir.glob(".*.tmp") if clean else ()):  # left by a killed run between write and rename
            stale.unlink(missing_ok=True)

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
        lines = ["index,label,seed,nfe"] + [f"{m['index']},{m.get('label', '')},{m['seed']},{m['nfe']:g}"
                                             for m in metas]
        path = self.out_dir / "labels.csv"
        atomic_write_text(path, "\n".join(lines) + "\n")
        return path

    def write_grid(self, count: int) -> Path | None:
        """The first `count` samples in a square grid, `grid.png`."""
        count = min(count, len(self.existing()))
        if count < 1:
            return None
        cols = int(np.ceil(np.sqrt(count)))
        tiles = [np.array(Image.open(self.path(i)).convert("RGB")) for i in range(count)]
        h, w, _ = tiles[0].shape
        grid = np.full((((count + cols - 1) // cols) * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
        for k, tile in enumerate(tiles):
            r, c = divmod(k, cols)
            grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = tile
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        path = self.out_dir / "grid.png"
        atomic_write_bytes(path, buf.getvalue())
        return path
