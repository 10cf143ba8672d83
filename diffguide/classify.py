"""`python -m diffguide.classify [model=NAME] [key=value ...]`: the Diffusion Classifier (Li et al. 2023; see
diffguide/classifiers/diffusion.py) of a class-conditional model on Fashion-MNIST images, or on exact draws of the
mixture for model=gmm. Config: conf/classify.yaml (the `model` group is the sampler's).

Writes, atomically, into out_dir (default outputs/classify/<time>): classify.json (accuracy with its 95% Wilson
interval, per-class accuracy, the confusion matrix [true][predicted], network evaluations per image, wall seconds,
images per second, the settings) and confusion.png; prints a one-line JSON summary on stdout. Every user error is
one line on stderr (`diffguide: error: ...`, exit 2) before any work; Ctrl-C is one line and exit 130. Each batch's
predictions are kept in out_dir/parts/ as they are made (store/partials.py): a rerun in the same folder keeps them
and classifies the rest (wall_s: the seconds of every batch, over every attempt); one process holds the folder.
"""

import io
import json
import math
import sys
from pathlib import Path

from diffguide.command import interrupt  # noqa: E402  (before the heavy imports below)

interrupt.install()

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from diffguide.store import atomic
from diffguide.store import checkpoint
from diffguide.command import checks
from diffguide.command import config, wrapper
from diffguide.classifiers import diffusion
from diffguide.data import fashion_mnist
from diffguide.metrics import intervals
from diffguide.errors import UserError, instantiate
from diffguide.store import partials
from diffguide.store.partials import Partials
from diffguide.runtime.device import resolve_device, resolve_precision

CONFIG_NAME = "classify"
USAGE = "usage: python -m diffguide.classify [model=NAME] [key=value ...]"
GMM_DEFAULT_IMAGES = 1000
Z95 = 1.959963984540054


def compose_config(overrides: list[str]) -> DictConfig:
    """conf/classify.yaml with the overrides."""
    return config.compose_config(CONFIG_NAME, overrides)


def _whole(cfg, key: str, least: int, none_ok: bool = False):
    value = cfg[key]
    if value is None and none_ok:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise UserError(f"{key}={value!r}: use a whole number >= {least}" + (", or null" if none_ok else ""))
    return value


def _int_list(cfg, key: str) -> list[int]:
    value = cfg[key]
    if not isinstance(value, (list, ListConfig)) or not value:
        raise UserError(f"{key}={value!r}: use a list of whole numbers, e.g. {key}=[50,500]")
    value = list(value)
    if any(not isinstance(v, int) or isinstance(v, bool) for v in value):
        raise UserError(f"{key}={value}: every entry must be a whole number")
    return value


def validate(cfg: DictConfig) -> dict:
    """The settings, checked (no model, no data): raises UserError with one line."""
    settings = {
        "num_images": _whole(cfg, "num_images", 1, none_ok=True),
        "batch_size": _whole(cfg, "batch_size", 1),
        "seed": _whole(cfg, "seed", 0),
        "n_samples": _int_list(cfg, "n_samples"),
        "to_keep": _int_list(cfg, "to_keep"),
        "split": cfg.split,
        "device": cfg.device,
        "precision": cfg.precision,
    }
    indices = cfg.indices
    if indices is not None:
        if not isinstance(indices, (list, ListConfig)) or not indices or any(
                not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in indices):
            raise UserError(f"indices={indices!r}: use a list of image indices >= 0, e.g. indices=[0,1,2], or null")
        if settings["num_images"] is not None:
            raise UserError("give num_images or indices, not both")
        indices = list(indices)
    settings["indices"] = indices

    if settings["split"] not in fashion_mnist.SPLITS:
        raise UserError(f"split={settings['split']!r} is not a Fashion-MNIST split: use one of "
                        f"{', '.join(fashion_mnist.SPLITS)}")
    diffusion.check_stages(settings["n_samples"], settings["to_keep"], num_classes=10 ** 9)
    resolve_device(str(settings["device"]))
    resolve_precision(str(settings["precision"]))
    return settings


def load_data(denoiser, settings: dict) -> tuple[torch.Tensor, torch.Tensor, list[str] | None, str]:
    """(images in the model's coordinates, labels, class names or None, what they are)."""
    from diffguide.models.gmm import GaussianMixture

    if isinstance(denoiser, GaussianMixture):
        if settings["indices"] is not None:
            raise UserError("indices= picks images of Fashion-MNIST; model=gmm draws its points: use num_images=N")
        n = settings["num_images"] or GMM_DEFAULT_IMAGES
        x, y = denoiser.sample_data(n, torch.Generator().manual_seed(settings["seed"]))
        return x, y, None, f"{n} exact draws of the mixture (seed {settings['seed']})"

    fashion_mnist.require_model(denoiser, "classify scores Fashion-MNIST (1x28x28 pixels): use a "
                                                  "Fashion-MNIST model or model=gmm")
    images, labels = fashion_mnist.load(settings["split"])
    if settings["indices"] is not None:
        bad = [i for i in settings["indices"] if i >= len(images)]
        if bad:
            raise UserError(f"indices: {bad[0]} is past the end of the {settings['split']} split "
                            f"({len(images)} images)")
        chosen = torch.tensor(settings["indices"])
        what = f"{len(chosen)} chosen images of the {settings['split']} split"
    else:
        n = settings["num_images"] or len(images)
        if n > len(images):
            raise UserError(f"num_images={n}: the {settings['split']} split has {len(images)} images")
        chosen = torch.arange(n)
        what = f"the first {n} images of the {settings['split']} split"
    return fashion_mnist.to_model_range(images[chosen]), labels[chosen], list(fashion_mnist.CLASSES), what


def wilson(correct: int, n: int) -> tuple[float, float]:
    return intervals.wilson(correct, n)


def summarise(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> dict:
    """Accuracy with its Wilson interval, per-class accuracy (None for a class with no image) and the confusion
    matrix [true][predicted]."""
    labels, predictions = labels.long().cpu(), predictions.long().cpu()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    n, correct = len(labels), int((labels == predictions).sum())
    low, high = wilson(correct, n)
    per_class = [None if confusion[c].sum() == 0 else float(confusion[c, c] / confusion[c].sum())
                 for c in range(num_classes)]
    return {"accuracy": correct / n if n else math.nan, "accuracy_lo": low, "accuracy_hi": high, "correct": correct,
            "num_images": n, "per_class_accuracy": per_class, "confusion": confusion.tolist()}


def confusion_png(confusion: list[list[int]], names: list[str] | None, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.tensor(confusion, dtype=torch.float64)
    rows = counts / counts.sum(1, keepdim=True).clamp(min=1)
    k = len(confusion)
    names = names or [str(c) for c in range(k)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k), dpi=100)
    ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def classify_all(denoiser, images: torch.Tensor, settings: dict, device: torch.device, parts: Partials,
                 hint: str) -> tuple[torch.Tensor, int, float]:
    """Predictions for every image, batch by batch, each batch's kept in `parts` as it is made (and taken from it
    where an earlier attempt made it); the network evaluations per image; the seconds every batch took (over every
    attempt)."""
    from tqdm import tqdm

    classes = denoiser.num_classes  # one forward: the chunk's images x the classes each still scores

    def make(begin: int, end: int) -> dict:
        chunk = images[begin:end].to(device)
        found = diffusion.classify(denoiser, chunk, settings["n_samples"], settings["to_keep"],
                                   seed=settings["seed"], batch=len(chunk) * classes)
        return {"predictions": found.predictions.cpu(), "nfe": int(found.nfe)}

    bar = tqdm(total=len(images), unit="img", disable=not sys.stderr.isatty(), leave=False)
    try:
        done = parts.each_batch(len(images), settings["batch_size"], make, "classified", hint, bar.update)
    finally:
        bar.close()
    return (torch.cat([p["predictions"] for p in done]), done[-1]["nfe"],
            sum(float(p["seconds"]) for p in done))


def prepare(cfg: DictConfig) -> tuple[dict, object, torch.Tensor, torch.Tensor, list | None, str, torch.device, Path]:
    """Every check before the long work: settings, model, data, output folder."""
    settings = validate(cfg)
    device = resolve_device(str(settings["device"]))
    dtype = resolve_precision(str(settings["precision"]))
    denoiser = instantiate(cfg.model).to(device).eval()
    denoiser.set_precision(dtype)
    T = diffusion.require_discrete(denoiser)
    diffusion.check_stages(settings["n_samples"], settings["to_keep"], denoiser.num_classes, T)
    images, labels, names, what = load_data(denoiser, settings)
    folder = Path(str(cfg.hydra.run.dir))
    checks.check_writable(folder, "out_dir" if cfg.out_dir is not None else "the output folder")
    return settings, denoiser, images, labels, names, what, device, folder


def run(cfg: DictConfig) -> dict:
    """Classify and write; returns what classify.json holds. Each batch's predictions are kept in out_dir/parts/ as
    they are made: a rerun in the same folder keeps them and classifies the rest."""
    settings, denoiser, images, labels, names, what, device, folder = prepare(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    resolved = OmegaConf.to_container(cfg, resolve=True)
    parts = Partials(folder, partials.settings_of(resolved), "diffguide classify")
    parts.claim("predictions")
    try:
        predictions, nfe, wall = classify_all(denoiser, images, settings, device, parts,
                                              partials.resume_hint(folder, cfg.out_dir is not None))
    finally:
        parts.release()
    summary = summarise(labels, predictions, denoiser.num_classes)
    result = {**summary, "nfe_per_image": nfe, "wall_s": round(wall, 3),
              "images_per_s": round(len(images) / wall, 3) if wall > 0 else None,
              "data": what, "class_names": names, "device": str(device),
              "pairs": settings["n_samples"][-1], "settings": resolved}
    title = f"{summary['accuracy']:.3f} [{summary['accuracy_lo']:.3f}, {summary['accuracy_hi']:.3f}] on {len(images)}"
    png = confusion_png(summary["confusion"], names, f"Diffusion Classifier: accuracy {title}")
    atomic.atomic_write_bytes(folder / "confusion.png", png)
    checkpoint.atomic_write_text(folder / "classify.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("accuracy", "accuracy_lo", "accuracy_hi", "num_images",
                                             "nfe_per_image", "wall_s", "images_per_s")} | {"out_dir": str(folder)}))
    return result


def entry(argv: list[str] | None = None) -> int:
    return wrapper.entry(argv, CONFIG_NAME, USAGE, "model, split, num_images, indices, n_samples, to_keep, batch_size, seed, device, precision, out_dir", 'is not classified here: use a class-conditional Fashion-MNIST model (fmnist_unet, fmnist_dit) or gmm', run,
                         resolved=("model",))


if __name__ == "__main__":
    sys.exit(entry())
