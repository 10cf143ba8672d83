"""Fashion-MNIST from its four IDX files, wherever a package manager or torchvision put them."""

import gzip
import os
import sys
from pathlib import Path

import numpy as np
import torch

from diffguide.errors import UserError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffguide" / "fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
SPLITS = tuple(_FILES)


def search_dirs() -> list[Path]:
    """DIFFGUIDE_FMNIST_DIR alone where it is set; else Debian's package, then torchvision's download folder."""
    if os.environ.get("DIFFGUIDE_FMNIST_DIR"):
        return [Path(os.environ["DIFFGUIDE_FMNIST_DIR"])]
    return [DEBIAN_DIR, DOWNLOAD_DIR / "FashionMNIST" / "raw"]


def _find(name: str) -> Path | None:
    for d in search_dirs():
        for candidate in (d / f"{name}.gz", d / name):
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path, offset: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def missing_message() -> str:
    where = ", ".join(str(d) for d in search_dirs())
    return (f"Fashion-MNIST not found (looked in {where}); install it with `apt-get install dataset-fashion-mnist` "
            f"(as root) or download it with `python -m diffguide.data.fashion_mnist --download`")


def check_available(split: str = "train") -> None:
    if split not in _FILES:
        raise UserError(f"unknown Fashion-MNIST split {split!r}: use one of {', '.join(SPLITS)}")
    images, labels, _ = _FILES[split]
    if _find(images) is None or _find(labels) is None:
        raise UserError(missing_message())


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 (N, 1, 28, 28) and labels as int64 (N,)."""
    check_available(split)
    images_name, labels_name, count = _FILES[split]
    images = _read_idx(_find(images_name), 16)
    labels = _read_idx(_find(labels_name), 8)
    if images.size != count * 28 * 28 or labels.size != count:
        raise UserError(f"Fashion-MNIST {split} files are truncated or corrupt ({_find(images_name)}); reinstall them")
    return (torch.from_numpy(images.copy()).view(count, 1, 28, 28),
            torch.from_numpy(labels.astype(np.int64)))


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0..255) -> the models' data range [-1, 1]."""
    return images.float() / 127.5 - 1


def require_model(denoiser, what: str) -> None:
    """Refuse, in one line, a model that does not make 1x28x28 pixels of Fashion-MNIST's 10 classes."""
    if tuple(denoiser.sample_shape) != (1, 28, 28) or tuple(denoiser.image_shape) != (1, 28, 28):
        raise UserError(f"model {type(denoiser).__name__} makes {'x'.join(map(str, denoiser.image_shape))} samples "
                        f"in a {'x'.join(map(str, denoiser.sample_shape))} space; {what}")
    if denoiser.num_classes != len(CLASSES):
        raise UserError(f"the model knows {denoiser.num_classes} classes; Fashion-MNIST has {len(CLASSES)}")


def download() -> None:
    import torchvision

    for train in (True, False):
        torchvision.datasets.FashionMNIST(str(DOWNLOAD_DIR), train=train, download=True)


if __name__ == "__main__":
    if "--download" in sys.argv:
        try:
            download()
        except Exception as exc:  # network closed, mirror down: say so in one line
            print(f"diffguide: error: Fashion-MNIST download failed ({exc.__class__.__name__}: {exc}); "
                  f"{missing_message()}", file=sys.stderr)
            sys.exit(1)
    try:
        for split in _FILES:
            check_available(split)
    except UserError as exc:
        print(f"diffguide: error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"Fashion-MNIST found: {_find(_FILES['train'][0]).parent}")
