"""`python -m diffguide.edit [inversion=ddim|cfgpp|null_text] [key=value ...]`: invert real images, regenerate them,
and edit their class. Config: conf/edit.yaml (the `model` group is the sampler's, `inversion` conf/inversion/).

Each image x (Fashion-MNIST test images by index, or a folder of 28x28 grayscale PNGs) is inverted under its own
class c with the DDIM grid of `steps` (diffguide/editing/inversion.py: plain DDIM inversion at CFG weight w, CFG++'s at
lambda, or null-text inversion: a w = 1 pivot and per-step optimised null embeddings), then regenerated from the
inverted noise with the same rule, weight (and null embeddings): the reconstruction. With edit.target=K the same
noise (and null embeddings) is regenerated under class K instead: the edit. No step clips x0 (clipping is not
invertible); images are clamped to [-1, 1] only for scoring and the grid.

Writes, atomically, into out_dir (default outputs/edit/<time>): edit.json -- reconstruction PSNR and SSIM
(torchmetrics.functional, images in [0, 1], data_range=1) per image and their mean with a 95% t-interval; for an edit
the evaluator's accuracy on the target class (95% Wilson interval), the edit's SSIM to the source and the L2
distance between the evaluator's penultimate features of edit and source (and, as the reference, of reconstruction
and source); for null_text the per-step losses (mean over images, before and after the optimisation, and the Adam
iterations); wall seconds; network evaluations per image -- and grid.png (rows source / reconstruction (/ edit)).
Prints one JSON line. Every user error is one line on stderr (`diffguide: error: ...`, exit 2) before any long
work, and nothing is written then; Ctrl-C is one line and exit 130. Each batch's inversion is kept in
out_dir/parts/ as it is made (store/partials.py): a rerun in the same folder keeps them and does the rest; one
process holds the folder. Fewer than MIN_STEPS steps is warned of in one line (measured below).
"""

import json
import math
import sys
import time
from pathlib import Path

from diffguide.command import interrupt  # noqa: E402  (before the heavy imports below)

interrupt.install()

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from diffguide.store import atomic
from diffguide.store import checkpoint
from diffguide.command import checks
from diffguide.command import config, wrapper
from diffguide.data import fashion_mnist
from diffguide.editing import inversion as inv
from diffguide.errors import UserError, instantiate
from diffguide.store import partials
from diffguide.store.partials import Partials
from diffguide.metrics import intervals
from diffguide.runtime.device import resolve_device, resolve_precision
from diffguide.store.samples import quantize, tile_png, to_uint8

CONFIG_NAME = "edit"
USAGE = "usage: python -m diffguide.edit [inversion=ddim|cfgpp|null_text] [key=value ...]"
INVERSIONS = ("ddim", "cfgpp", "null_text")
SPACINGS = ("leading", "trailing", "linspace")
SIZE = (28, 28)


def compose_config(overrides: list[str]) -> DictConfig:
    """conf/edit.yaml with the overrides."""
    return config.compose_config(CONFIG_NAME, overrides)


# --- settings ---------------------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole(value, key: str, least: int):
    if not _is_int(value) or value < least:
        raise UserError(f"{key}={value!r}: use a whole number >= {least}")
    return value


def _number(value, key: str, least: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            (value <= least if strict else value < least):
        raise UserError(f"{key}={value!r}: use a finite number {'>' if strict else '>='} {least:g}")
    return float(value)


def _int_list(value, key: str, example: str) -> list[int]:
    if not isinstance(value, (list, ListConfig)) or not value or any(not _is_int(v) or v < 0 for v in value):
        raise UserError(f"{key}={value!r}: use a list of whole numbers >= 0, e.g. {key}={example}")
    return list(value)


def validate(cfg: DictConfig) -> dict:
    """The settings, checked (no model, no data): raises UserError with one line."""
    node = cfg.inversion
    name = node.get("name") if isinstance(node, DictConfig) else None
    if name not in INVERSIONS:
        raise UserError(f"inversion.name={name!r} is not one of {', '.join(INVERSIONS)}")
    scale = cfg.scale if cfg.scale is not None else node.get("scale")
    s = {
        "inversion": name,
        "scale": _number(scale, "scale", 0.0),
        "steps": _whole(cfg.steps, "steps", 1),
        "batch_size": _whole(cfg.batch_size, "batch_size", 1),
        "grid_size": _whole(cfg.grid_size, "grid_size", 0),
        "seed": _whole(cfg.seed, "seed", 0),
        "spacing": cfg.spacing,
        "device": str(cfg.device),
        "precision": str(cfg.precision),
        "folder": None if cfg.folder is None else str(cfg.folder),
        "images": None,
        "labels": None if cfg.labels is None else _int_list(cfg.labels, "labels", "[6,4]"),
        "target": cfg.edit.target,
        "evaluator": str(cfg.evaluator),
    }
    if s["spacing"] not in SPACINGS:
        raise UserError(f"spacing={s['spacing']!r} is not one of {', '.join(SPACINGS)}")
    if s["folder"] is None:
        s["images"] = _int_list(cfg.images, "images", "[0,1,2]")
    if s["target"] is not None and (not _is_int(s["target"]) or s["target"] < 0):
        raise UserError(f"edit.target={s['target']!r}: use a class index (0..9), or null for no edit")
    if name == "null_text":
        s["inner_steps"] = _whole(node.inner_steps, "inversion.inner_steps", 0)
        s["lr"] = _number(node.lr, "inversion.lr", 0.0, strict=True)
        s["epsilon"] = _number(node.epsilon, "inversion.epsilon", 0.0)
    resolve_device(s["device"])
    resolve_precision(s["precision"])
    return s


def read_folder(folder: str) -> tuple[torch.Tensor, list[str]]:
    """The folder's PNGs (sorted by name) as uint8 (N, 1, 28, 28); one line for a missing folder or a bad image."""
    from PIL import Image

    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"folder={folder}: {'not a folder' if path.exists() else 'no such folder'}")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise UserError(f"folder={folder} holds no .png images")
    images = []
    for p in files:
        try:
            with Image.open(p) as img:
                img.load()
                mode, size = img.mode, img.size
                pixels = np.array(img.convert("L")) if mode in ("L", "LA", "P", "1") else None
        except Exception as exc:
            raise UserError(f"folder={folder}: {p.name} is not a readable PNG ({type(exc).__name__})") from None
        if size != SIZE:
            raise UserError(f"folder={folder}: {p.name} is {size[0]}x{size[1]}; Fashion-MNIST images are 28x28")
        if pixels is None:
            raise UserError(f"folder={folder}: {p.name} is {mode}, not grayscale; convert it to 8-bit grayscale (L)")
        images.append(torch.from_numpy(pixels))
    return torch.stack(images)[:, None], [p.name for p in files]


def load_images(s: dict) -> tuple[torch.Tensor, torch.Tensor | None, list]:
    """(uint8 images (N, 1, 28, 28), their labels or None, what each image is: a test index or a file name)."""
    if s["folder"] is not None:
        images, names = read_folder(s["folder"])
        return images, None, names

    images, labels = fashion_mnist.load("test")
    bad = [i for i in s["images"] if i >= len(images)]
    if bad:
        raise UserError(f"images: index {bad[0]} is past the end of the test split ({len(images)} images, "
                        f"0..{len(images) - 1})")
    chosen = torch.tensor(s["images"])
    return images[chosen], labels[chosen], list(s["images"])


#: the fewest steps at which inversion holds: DDIM inversion of fmnist_unet at w = 1 regenerates 16 test images at a
#: mean PSNR of 10.2 / 12.6 / 19.2 / 23.3 / 26.1 / 28.2 / 34.4 dB with 5 / 10 / 20 / 30 / 40 / 50 / 100 steps (CFG++ at
#: lambda 0.6: 19.4 dB at 20, 23.2 at 30, 26.3 at 50); below 40 the reconstruction falls under 25 dB
#: (`python -m diffguide.edit steps=N 'images=[0,...,15]' batch_size=16`, 2026-12-07)
MIN_STEPS = 40


def check_model(denoiser, s: dict) -> None:

    fashion_mnist.require_model(denoiser, "edit inverts Fashion-MNIST pixels (1x28x28): use a Fashion-MNIST "
                                                  "model (fmnist_unet, fmnist_dit)")
    if denoiser.null_class is None and (s["inversion"] != "ddim" or s["scale"] != 1.0):
        raise UserError(f"model {type(denoiser).__name__} has no null class: only inversion=ddim at scale=1 works")
    if s["inversion"] == "null_text":
        inv.require_label_embeddings(denoiser)
    if s["target"] is not None and s["target"] >= denoiser.num_classes:
        raise UserError(f"edit.target={s['target']} is not a class: use 0..{denoiser.num_classes - 1} "
                        f"({', '.join(f'{k} {n}' for k, n in enumerate(fashion_mnist.CLASSES))})")
    if s["labels"] is not None and any(k >= denoiser.num_classes for k in s["labels"]):
        raise UserError(f"labels: {max(s['labels'])} is not a class: use 0..{denoiser.num_classes - 1}")
    if s["steps"] < MIN_STEPS:
        s["warnings"].append(f"steps={s['steps']} is too few for inversion to hold: with fewer than {MIN_STEPS} "
                             f"steps the embedded model's reconstructions fall under 25 dB PSNR (19 dB at 20, 23 at "
                             f"30, 26 at 40)")
    if s["inversion"] == "cfgpp" and s["scale"] > 1.0:
        s["warnings"].append(f"cfgpp scale (lambda) {s['scale']} is outside the paper's range [0, 1]")


def prepare(cfg: DictConfig):
    """Every check before the long work: settings, model, evaluator, data, levels, output folder."""
    from diffguide.classifiers import evaluator as evaluator_lib
    from diffguide.samplers.ddim import DDIM

    s = validate(cfg)
    s["warnings"] = []  # shown once every check has passed: an error is then the only line
    device = resolve_device(s["device"])
    dtype = resolve_precision(s["precision"])
    denoiser = instantiate(cfg.model).to(device).eval()
    denoiser.set_precision(dtype)
    check_model(denoiser, s)
    evaluator = evaluator_lib.load(s["evaluator"]).to(device)
    images, labels, sources = load_images(s)
    if s["labels"] is not None:
        if len(s["labels"]) != len(images):
            raise UserError(f"labels: {len(s['labels'])} classes given for {len(images)} images")
        labels = torch.tensor(s["labels"])
    levels = DDIM(s["steps"], spacing=s["spacing"], clip_x0=False).levels(denoiser)
    folder = Path(str(cfg.hydra.run.dir))
    checks.check_writable(folder, "out_dir" if cfg.out_dir is not None else "the output folder")
    for warning in s["warnings"]:
        print(f"diffguide: warning: {warning}", file=sys.stderr)
    return s, device, denoiser, evaluator, images, labels, sources, levels, folder


# --- scoring ----------------------------------------------------------------------------------------------------------

Z95 = 1.959963984540054


def mean_interval(values) -> dict:
    """Mean with its 95% Student-t interval (None where undefined)."""
    x = [v for v in values if v is not None and math.isfinite(v)]
    if len(x) == 0:
        return {"mean": None, "lo": None, "hi": None}
    if len(x) < 2:
        return {"mean": float(x[0]), "lo": None, "hi": None}
    mean, low, high = intervals.t_interval(x)
    return {"mean": mean, "lo": low, "hi": high}


def _finite(v: float):
    return float(v) if math.isfinite(v) else None  # PSNR of an exact copy is inf: JSON has none


def unit(x: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] (clamped) -> [0, 1]."""
    return (x.float().clamp(-1, 1) + 1) / 2


def psnr_ssim(pred: torch.Tensor, target: torch.Tensor) -> tuple[list, list]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    p, t = unit(pred).cpu(), unit(target).cpu()
    psnr = peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none")
    return [_finite(v) for v in psnr.tolist()], [float(v) for v in ssim.reshape(-1).tolist()]


def grid_png(rows: list[torch.Tensor], count: int) -> bytes:
    """Rows of images (each (N, 1, 28, 28) in [-1, 1]), the first `count` of each, 2-pixel white borders."""
    count = min(count, len(rows[0]))
    if count < 1:  # grid_size=0: one white column, a tile's place per row
        return tile_png([np.full((*SIZE, 1), 255, np.uint8)] * len(rows), 1)
    return tile_png([tile for row in rows for tile in to_uint8(row[:count])], count)


# --- the run ----------------------------------------------------------------------------------------------------------


def _invert_batch(s: dict, denoiser, x0: torch.Tensor, labels: torch.Tensor, levels, target):
    """(reconstruction, edit or None, evaluations per image {inversion, regeneration, edit}, null-text record)."""
    w, name = s["scale"], s["inversion"]
    rule = "cfgpp" if name == "cfgpp" else "cfg"
    record, embeddings = None, None
    if name == "null_text":
        found = inv.null_text_invert(denoiser, x0, labels, levels, w, s["inner_steps"], s["lr"], s["epsilon"])
        xT, nfe_inv, embeddings = found.xT, found.nfe, found.embeddings
        record = found
    else:
        found = (inv.cfgpp_invert if rule == "cfgpp" else inv.ddim_invert)(denoiser, x0, labels, levels, w)
        xT, nfe_inv = found.xT, found.nfe
    rec, nfe_rec = inv.regenerate(denoiser, xT, labels, levels, w, embeddings, rule)
    edit, nfe_edit = None, None
    if target is not None:
        edit, nfe_edit = inv.regenerate(denoiser, xT, torch.full_like(labels, target), levels, w, embeddings, rule)
    return rec, edit, {"inversion": nfe_inv, "regeneration": nfe_rec, "edit": nfe_edit}, record


def run(cfg: DictConfig) -> dict:
    """Invert, regenerate, edit, score and write; returns what edit.json holds."""

    start = time.perf_counter()
    s, device, denoiser, evaluator, images, labels, sources, levels, folder = prepare(cfg)
    torch.manual_seed(s["seed"])
    with torch.no_grad():
        feats_src, logits_src = evaluator.features_and_logits(images.to(device))
    guessed = labels is None
    if guessed:  # a folder's images: their class is the evaluator's guess
        labels = logits_src.argmax(1).cpu()
    target = s["target"]
    with open_dict(cfg):
        del cfg["hydra"]
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def make(begin: int, end: int) -> dict:
        x0 = fashion_mnist.to_model_range(images[begin:end]).to(device)
        rec, edit, nfe_batch, record = _invert_batch(s, denoiser, x0, labels[begin:end].to(device), levels, target)
        part = {"rec": rec.cpu(), "nfe": nfe_batch}
        if edit is not None:
            part["edit"] = edit.cpu()
        if record is not None:
            part["null_text"] = {"loss_before": record.loss_before.cpu(), "loss_after": record.loss_after.cpu(),
                                 "iterations": record.iterations.double().cpu()}
        return part

    parts = Partials(folder, partials.settings_of(resolved), "diffguide edit")
    parts.claim("inversions")
    try:
        done = parts.each_batch(len(images), s["batch_size"], make, "inverted",
                                partials.resume_hint(folder, cfg.out_dir is not None))
    finally:
        parts.release()
    recs = [p["rec"] for p in done]
    edits = [p["edit"] for p in done if "edit" in p]
    nfe, wall_invert = done[-1]["nfe"], sum(float(p["seconds"]) for p in done)
    losses_before = [p["null_text"]["loss_before"] for p in done if "null_text" in p]
    losses_after = [p["null_text"]["loss_after"] for p in done if "null_text" in p]
    iterations = [p["null_text"]["iterations"] for p in done if "null_text" in p]
    rec = torch.cat(recs)
    source = fashion_mnist.to_model_range(images)
    psnr, ssim = psnr_ssim(rec, source)
    result = {
        "inversion": s["inversion"], "scale": s["scale"],
        "scale_is": "lambda (CFG++)" if s["inversion"] == "cfgpp" else "w (CFG weight; 1: the conditional model)",
        "steps": s["steps"], "spacing": s["spacing"], "num_images": len(images),
        "images": sources, "labels": labels.tolist(), "labels_from": "evaluator" if guessed else (
            "labels" if s["labels"] is not None else "test split"),
        "reconstruction": {"psnr": psnr, "ssim": ssim, "psnr_mean": mean_interval(psnr),
                           "ssim_mean": mean_interval(ssim)},
        "edit": None, "null_text": None,
    }
    if target is not None:
        edit = torch.cat(edits)
        with torch.no_grad():
            feats_edit, logits_edit = evaluator.features_and_logits(quantize(edit).to(device))
            feats_rec, _ = evaluator.features_and_logits(quantize(rec).to(device))
        hits = (logits_edit.argmax(1).cpu() == target)
        low, high = intervals.wilson(int(hits.sum()), len(hits))
        _, ssim_edit = psnr_ssim(edit, source)
        dist_edit = (feats_edit - feats_src).norm(dim=1).cpu().tolist()
        dist_rec = (feats_rec - feats_src).norm(dim=1).cpu().tolist()
        result["edit"] = {
            "target": target, "target_name": fashion_mnist.CLASSES[target],
            "accuracy": float(hits.double().mean()), "accuracy_lo": low, "accuracy_hi": high,
            "ssim_to_source": ssim_edit, "ssim_to_source_mean": mean_interval(ssim_edit),
            "feature_distance": dist_edit, "feature_distance_mean": mean_interval(dist_edit),
            "feature_distance_reconstruction": dist_rec,
            "feature_distance_reconstruction_mean": mean_interval(dist_rec),
        }
    if losses_before:
        before, after = torch.cat(losses_before, 1), torch.cat(losses_after, 1)
        result["null_text"] = {
            "inner_steps": s["inner_steps"], "lr": s["lr"], "epsilon": s["epsilon"],
            "loss_before": before.mean(1).tolist(), "loss_after": after.mean(1).tolist(),
            "adam_iterations": torch.cat(iterations, 1).mean(1).tolist(),
            "note": "per step (levels high to low), mean over images of MSE(z*_{t-1}, DDIM step) before and after "
                    "the null embedding's optimisation",
        }
    result["nfe_per_image"] = nfe
    result["wall_s"] = {"inversion_and_regeneration": round(wall_invert, 3),
                        "total": round(time.perf_counter() - start, 3)}
    result["device"], result["precision"] = str(device), s["precision"]
    result["settings"] = resolved
    rows = [source, rec] + ([torch.cat(edits)] if target is not None else [])
    atomic.atomic_write_bytes(folder / "grid.png", grid_png(rows, s["grid_size"]))
    checkpoint.atomic_write_text(folder / "edit.json", json.dumps(result, indent=2) + "\n")
    summary = {"inversion": s["inversion"], "scale": s["scale"], "steps": s["steps"], "num_images": len(images),
               "psnr": result["reconstruction"]["psnr_mean"]["mean"],
               "ssim": result["reconstruction"]["ssim_mean"]["mean"]}
    if result["edit"] is not None:
        summary |= {"edit_target": target, "edit_accuracy": result["edit"]["accuracy"],
                    "edit_ssim": result["edit"]["ssim_to_source_mean"]["mean"]}
    summary |= {"wall_s": result["wall_s"]["total"], "out_dir": str(folder)}
    print(json.dumps(summary))
    return result


def entry(argv: list[str] | None = None) -> int:
    return wrapper.entry(argv, CONFIG_NAME, USAGE, ("model, inversion (ddim | cfgpp | null_text: inner_steps, lr, epsilon), images, folder, labels, steps, "
                         "spacing, scale, edit.target, evaluator, batch_size, grid_size, seed, device, precision, out_dir"), 'cannot be inverted here: use a class-conditional Fashion-MNIST model (fmnist_unet, fmnist_dit)', run,
                         resolved=("model", "inversion"))


if __name__ == "__main__":
    sys.exit(entry())
