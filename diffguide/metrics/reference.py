"""The reference set's files: an .npz reference batch in the ADM evaluation suite's format, and diffguide's cache of
a reference set's features."""

import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from diffguide.store import atomic
from diffguide.errors import UserError


class ReferenceFile:
    """A reference set as users have it for ImageNet: an .npz in the ADM evaluation suite's reference-batch format
    (`arr_0`: uint8 images N x H x W x 3; `mu`, `sigma`: Inception pool statistics), either part optional. FID uses
    `mu`/`sigma` when present (as ADM's evaluator does), else the images; KID and precision/recall need images.
    The images are read only when their features are not cached."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with np.load(self.path) as data:
            keys = set(data.files)
            self.stats = {"mu": data["mu"], "sigma": data["sigma"]} if {"mu", "sigma"} <= keys else None
        self.has_images = "arr_0" in keys

    def images(self) -> "_ArrayImages":
        with np.load(self.path) as data:
            return _ArrayImages(data["arr_0"])

    @staticmethod
    def check(path: Path) -> dict[str, tuple[tuple, np.dtype]]:
        """The shape and dtype of each array, from the headers (a reference batch is GBs: nothing is loaded)."""
        try:
            arrays = _npz_headers(path)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise UserError(f"metric.reference={path}: not a readable .npz ({_first_line(exc)})") from None
        if "arr_0" not in arrays and not {"mu", "sigma"} <= set(arrays):
            raise UserError(f"metric.reference={path}: an .npz reference needs arr_0 (images) or mu and sigma "
                            f"(statistics); it has {', '.join(sorted(arrays)) or 'nothing'}")
        if "arr_0" in arrays:
            shape, dtype = arrays["arr_0"]
            if len(shape) != 4 or shape[-1] not in (1, 3) or dtype != np.uint8 or shape[0] < 1:
                raise UserError(f"metric.reference={path}: arr_0 must be uint8 N x H x W x 3 images "
                                f"(got {dtype} {shape})")
        if {"mu", "sigma"} <= set(arrays):
            (mu, _), (sigma, _) = arrays["mu"], arrays["sigma"]
            if len(mu) != 1 or sigma != (mu[0], mu[0]):
                raise UserError(f"metric.reference={path}: mu must be a vector of D features and sigma D x D "
                                f"(got mu {mu}, sigma {sigma})")
        return arrays


def _npz_headers(path) -> dict[str, tuple[tuple, np.dtype]]:
    out = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if member.endswith(".npy"):
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                out[member[:-4]] = (shape, dtype)
    return out


class _ArrayImages(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray):
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise UserError(f"reference arr_0 must be uint8 N x H x W x 3 images (got {images.dtype} {images.shape})")
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return image.expand(3, -1, -1).contiguous()


class FeatureCache:
    """One reference set's features in an .npz: `features_<layer>` arrays, `key` (the JSON of what they depend on)
    and `sha256` (a digest of all the others). Read with allow_pickle=False, so a file planted in a shared cache folder
    runs nothing; a truncated, garbled or mismatched file is reported in one line and computed again."""

    def __init__(self, path: Path):
        self.path = path

    @staticmethod
    def digest(arrays: dict[str, np.ndarray]) -> str:
        h = hashlib.sha256()
        for name in sorted(set(arrays) - {"sha256"}):
            array = np.ascontiguousarray(arrays[name])
            h.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
            h.update(array.tobytes())
        return h.hexdigest()

    def read(self, key: str, layers: list[str]) -> dict[str, torch.Tensor] | None:
        if not self.path.exists():
            return None
        try:
            return self._read(key, layers)
        except ValueError as exc:
            print(f"diffguide: warning: the cached reference features {self.path} are damaged ({exc}); "
                  f"recomputing them", file=sys.stderr)
            return None

    def _read(self, key, layers):
        try:
            with np.load(self.path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except Exception as exc:  # truncated zip, garbage, pickled objects: whatever it is, it is not our file
            # (numpy's own words for a pickle suggest loading it unsafely: not advice for a cache file)
            why = "pickled data, not loaded" if "pickle" in str(exc) else _first_line(exc)
            raise ValueError(f"not a readable .npz: {why}") from None
        expected = {"key", "sha256", *(f"features_{layer}" for layer in layers)}
        if set(arrays) != expected:
            raise ValueError(f"it holds the arrays {', '.join(sorted(arrays))}; expected {', '.join(sorted(expected))}")
        if arrays["sha256"].shape != () or str(arrays["sha256"]) != self.digest(arrays):
            raise ValueError("its sha256 does not match its content")
        if arrays["key"].shape != () or str(arrays["key"]) != key:
            raise ValueError("it was written for other settings")
        features = {layer: arrays[f"features_{layer}"] for layer in layers}
        sizes = {len(f) if f.ndim == 2 and f.dtype.kind == "f" else -1 for f in features.values()}
        if len(sizes) != 1 or min(sizes) < 1 or not all(f.dtype.isnative for f in features.values()):
            raise ValueError(f"its feature arrays are not N x D floats of one N "
                             f"({', '.join(f'{f.dtype} {f.shape}' for f in features.values())})")
        return {layer: torch.from_numpy(f) for layer, f in features.items()}

    def write(self, key: str, features: dict[str, torch.Tensor]) -> None:
        arrays = {"key": np.array(key), **{f"features_{layer}": f.numpy() for layer, f in features.items()}}
        arrays["sha256"] = np.array(self.digest(arrays))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        try:
            atomic.atomic_write_bytes(self.path, buffer.getvalue())
        except (OSError, atomic.DiskFull) as exc:  # the scores do not need the cache
            print(f"diffguide: warning: cannot cache the reference features in {self.path} ({_first_line(exc)}); "
                  f"scoring goes on without the cache", file=sys.stderr)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
