"""Sample-quality metrics through torch-fidelity: FID, IS, KID, precision/recall, plus class accuracy.

torch-fidelity computes every statistic; this module only registers the feature extractor and the reference set it
should use, and names the results for what they are (`fid_fmnist` is not Inception FID).
"""

import os
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY

from diffguide import checkpoint
from diffguide.data import fashion_mnist
from diffguide.errors import UserError
from diffguide.metrics import evaluator as evaluator_lib

_RENAME = {"frechet_inception_distance": "fid", "inception_score_mean": "isc", "inception_score_std": "isc_std",
           "kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std",
           "precision": "precision", "recall": "recall", "f_score": "f_score"}


def default_cache_root() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffguide" / "fidelity")


class Metric:
    """Scores a folder of samples. `check` runs before sampling so that a missing file fails fast."""

    def check(self) -> None:
        pass

    def __call__(self, samples_dir: Path, labels: list[int], device: torch.device) -> dict[str, float]:
        return {}


class NoMetrics(Metric):
    pass


class FidelityMetric(Metric):
    def __init__(self, fid=True, isc=True, kid=True, prc=True, batch_size=500, kid_subset_size=1000, isc_splits=10,
                 cache_root=None, save_cpu_ram=None, suffix=""):
        self.flags = {"fid": fid, "isc": isc, "kid": kid, "prc": prc}
        self.batch_size, self.kid_subset_size, self.isc_splits = batch_size, kid_subset_size, isc_splits
        self.cache_root = cache_root or default_cache_root()
        self.suffix = suffix
        # torch-fidelity's switch for DataLoader workers (and chunked precision/recall, same result): on a few cores
        # the worker processes cost more than they save.
        self.save_cpu_ram = (os.cpu_count() or 1) <= 4 if save_cpu_ram is None else save_cpu_ram

    def fidelity_kwargs(self) -> dict:
        """The feature extractor, its weights and the reference input (input2)."""
        raise NotImplementedError

    #: the reference set: a subclass's own names, or a reference batch file (.npz, see ReferenceFile)
    reference: str = ""

    @property
    def reference_file(self) -> Path | None:
        return Path(self.reference) if str(self.reference).endswith(".npz") else None

    def __call__(self, samples_dir, labels, device):
        n = len(labels)
        if self.flags["prc"] and n <= 3:
            raise UserError(f"precision/recall need more than 3 samples (have {n})")
        reference = ReferenceFile(self.reference_file) if self.reference_file is not None else None
        flags = dict(self.flags)
        kwargs = dict(input1=SampleFiles(samples_dir, n), cuda=device.type == "cuda", batch_size=self.batch_size,
                      kid_subset_size=min(self.kid_subset_size, n), isc_splits=min(self.isc_splits, n),
                      cache_root=self.cache_root, save_cpu_ram=self.save_cpu_ram, verbose=False,
                      **self.fidelity_kwargs())
        if reference is not None:
            if reference.stats is not None:
                flags["fid"] = False  # FID against the file's own statistics, below
            if reference.images is None:
                flags["kid"] = flags["prc"] = False
                kwargs.pop("input2", None)
            else:
                kwargs["input2"] = reference.images
        raw = {}
        # torch-fidelity prints its progress on stdout; keep stdout for our own report.
        with redirect_stdout(sys.stderr):
            if any(flags.values()):
                raw = torch_fidelity.calculate_metrics(**kwargs, **flags)
            if reference is not None and reference.stats is not None and self.flags["fid"]:
                raw["frechet_inception_distance"] = fid_against_statistics(reference.stats, kwargs)
        return {f"{_RENAME[k]}{self.suffix}": float(v) for k, v in raw.items() if k in _RENAME}


def fid_against_statistics(stats: dict, kwargs: dict) -> float:
    """FID of input1's features against precomputed (mu, sigma), with torch-fidelity's extractor and formula."""
    from torch_fidelity.metric_fid import fid_input_id_to_statistics, fid_statistics_to_metric
    from torch_fidelity.utils import create_feature_extractor, resolve_feature_layer_for_metric

    layer = resolve_feature_layer_for_metric("fid", **kwargs)
    extractor = create_feature_extractor(kwargs["feature_extractor"], [layer], cuda=kwargs["cuda"],
                                         feature_extractor_weights_path=kwargs.get("feature_extractor_weights_path"))
    ours = fid_input_id_to_statistics(1, extractor, layer, **{**kwargs, "cache": False})
    theirs = {"mu": stats["mu"].astype(ours["mu"].dtype), "sigma": stats["sigma"].astype(ours["sigma"].dtype)}
    if theirs["mu"].shape != ours["mu"].shape:
        raise UserError(f"the reference statistics have {theirs['mu'].shape[0]} features, the feature extractor "
                        f"{kwargs['feature_extractor']} gives {ours['mu'].shape[0]}")
    return fid_statistics_to_metric(ours, theirs, False)["frechet_inception_distance"]


class ReferenceFile:
    """A reference set as users have it for ImageNet: an .npz in the ADM evaluation suite's reference-batch format
    (`arr_0`: uint8 images N x H x W x 3; `mu`, `sigma`: Inception pool statistics), either part optional. FID uses
    `mu`/`sigma` when present (as ADM's evaluator does), else the images; KID and precision/recall need images."""

    def __init__(self, path: Path):
        with np.load(path) as data:
            keys = set(data.files)
            self.stats = {"mu": data["mu"], "sigma": data["sigma"]} if {"mu", "sigma"} <= keys else None
            images = data["arr_0"] if "arr_0" in keys else None
        self.images = _ArrayImages(images) if images is not None else None

    @staticmethod
    def check(path: Path) -> None:
        try:
            with np.load(path) as data:
                keys = set(data.files)
        except (OSError, ValueError) as exc:
            raise UserError(f"metric.reference={path}: not a readable .npz ({exc})") from None
        if "arr_0" not in keys and not {"mu", "sigma"} <= keys:
            raise UserError(f"metric.reference={path}: an .npz reference needs arr_0 (images) or mu and sigma "
                            f"(statistics); it has {', '.join(sorted(keys)) or 'nothing'}")


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


class SampleFiles(torch.utils.data.Dataset):
    """samples/000000.png ... samples/{n-1}.png as uint8 RGB tensors: exactly the requested samples, even where the
    folder holds more from an earlier, larger run."""

    def __init__(self, samples_dir, count: int):
        self.dir, self.count = Path(samples_dir), count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        pixels = np.array(Image.open(self.dir / f"{i:06d}.png").convert("RGB"))
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class EvaluatorFeatures(FeatureExtractorBase):
    """The Fashion-MNIST evaluator as a torch-fidelity feature extractor: 'features' (penultimate) and 'logits'."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.model = evaluator_lib.load(feature_extractor_weights_path)

    def forward(self, x):
        # torch-fidelity hands over uint8 RGB (grayscale PNGs are expanded): the evaluator reads one channel.
        features, logits = self.model.features_and_logits(x[:, :1].to(next(self.model.parameters()).device))
        out = {"features": features.float(), "logits": logits.float()}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)


class _FashionMNISTImages(torch.utils.data.Dataset):
    def __init__(self, split):
        self.images = fashion_mnist.load(split)[0]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].expand(3, -1, -1)


class FashionMNISTMetrics(FidelityMetric):
    """Metrics in the feature space of this project's Fashion-MNIST evaluator, against a Fashion-MNIST split."""

    def __init__(self, evaluator: str, reference: str = "test", class_accuracy: bool = True, **kwargs):
        super().__init__(suffix="_fmnist", **kwargs)
        self.evaluator_path, self.reference, self.class_accuracy = evaluator, reference, class_accuracy

    def check(self):
        evaluator_lib.load(self.evaluator_path)
        if self.reference_file is not None:
            ReferenceFile.check(self.reference_file)
        else:
            fashion_mnist.check_available(self.reference)

    def fidelity_kwargs(self):
        # The weights' digest is in the extractor's name, and so in torch-fidelity's cache key: retrained weights
        # never meet reference statistics cached with the old ones.
        name = f"fmnist-evaluator-{checkpoint.file_digest(self.evaluator_path)}"
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            torch_fidelity.register_feature_extractor(name, EvaluatorFeatures)
        if self.reference_file is not None:
            return {"feature_extractor": name, "feature_extractor_weights_path": self.evaluator_path}
        dataset = f"fmnist-{self.reference}"
        if dataset not in DATASETS_REGISTRY:
            torch_fidelity.register_dataset(dataset, lambda root, download, split=self.reference:
                                            _FashionMNISTImages(split))
        return {"feature_extractor": name, "feature_extractor_weights_path": self.evaluator_path, "input2": dataset}

    def __call__(self, samples_dir, labels, device):
        scores = super().__call__(samples_dir, labels, device)
        if self.class_accuracy:
            scores["class_accuracy"] = class_accuracy(evaluator_lib.load(self.evaluator_path).to(device),
                                                      samples_dir, labels, device)
        return scores


@torch.no_grad()
def class_accuracy(model, samples_dir: Path, labels: list[int], device, batch_size: int = 500) -> float:
    """Share of samples the evaluator assigns to the class they were generated for."""
    correct = 0
    for start in range(0, len(labels), batch_size):
        chunk = range(start, min(start + batch_size, len(labels)))
        images = np.stack([np.array(Image.open(Path(samples_dir) / f"{i:06d}.png").convert("L")) for i in chunk])
        logits = model(torch.from_numpy(images)[:, None].to(device))
        correct += (logits.argmax(1).cpu() == torch.tensor([labels[i] for i in chunk])).sum().item()
    return correct / len(labels)


class InceptionMetrics(FidelityMetric):
    """torch-fidelity's Inception-v3 (`inception-v3-compat`) for RGB models, or another of its extractors
    (`feature_extractor=dinov2-vit-l-14`: the Frechet distance in DINOv2 features that recent papers report as
    FD_DINOv2, named `fid_dinov2` here; DINOv2 has no class logits, so no IS).

    weights: a local copy of the extractor's weights file, for clusters without internet (None: torch-fidelity
    downloads). reference: a dataset registered in torch-fidelity (e.g. `cifar10-train`), a folder of reference
    images, or an .npz reference batch (ADM's format: images `arr_0` and/or statistics `mu`, `sigma`).
    """

    def __init__(self, reference: str, weights: str | None = None, feature_extractor: str = "inception-v3-compat",
                 **kwargs):
        dinov2 = feature_extractor.startswith("dinov2")
        super().__init__(suffix="_dinov2" if dinov2 else "", **kwargs)
        if dinov2:
            self.flags["isc"] = False
        self.reference, self.weights, self.feature_extractor = reference, weights, feature_extractor

    def check(self):
        if self.feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
            raise UserError(f"metric.feature_extractor={self.feature_extractor!r} is not one of torch-fidelity's "
                            f"({', '.join(FEATURE_EXTRACTORS_REGISTRY)})")
        if self.weights is not None and not Path(self.weights).is_file():
            raise UserError(f"feature extractor weights file not found: {self.weights} (metric.weights)")
        if self.reference_file is not None:
            ReferenceFile.check(self.reference_file)
        elif self.reference not in DATASETS_REGISTRY and not Path(self.reference).is_dir():
            raise UserError(f"metric.reference={self.reference!r} is neither a torch-fidelity dataset "
                            f"({', '.join(sorted(DATASETS_REGISTRY))}), a folder of images, nor an .npz file")

    def fidelity_kwargs(self):
        kwargs = {"feature_extractor": self.feature_extractor, "feature_extractor_weights_path": self.weights,
                  "datasets_download": self.weights is None}
        if self.reference_file is None:
            kwargs["input2"] = self.reference
        return kwargs
