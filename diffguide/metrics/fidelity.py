"""Sample-quality metrics through torch-fidelity: FID, IS, KID, precision/recall, plus class accuracy.

torch-fidelity extracts the features and computes every statistic from them with its own functions; this module
registers the feature extractor and the reference set it should use, keeps the reference set's features in its own
cache (see `FeatureCache`; torch-fidelity's cache is a pickle and is never read or written), and names the results for
what they are (`fid_fmnist` is not Inception FID).
"""

import hashlib
import io
import json
import math
import os
import re
import sys
import zipfile
from contextlib import redirect_stdout
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import (create_feature_extractor, extract_featuresdict_from_input_id, glob_samples_paths,
                                  resolve_feature_layer_for_metric)

from diffguide import checkpoint
from diffguide.data import fashion_mnist
from diffguide.errors import UserError
from diffguide.metrics import evaluator as evaluator_lib

_RENAME = {"frechet_inception_distance": "fid", "inception_score_mean": "isc", "inception_score_std": "isc_std",
           "kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std",
           "precision": "precision", "recall": "recall", "f_score": "f_score"}

# The fewest images each metric is defined on: a covariance (FID) and the unbiased MMD (KID) need 2, precision/recall
# the 3rd nearest neighbour of each point among the others, so 4; IS one per split.
_LEAST = {"fid": 2, "kid": 2, "prc": 4, "isc": 1}
_WHY = {"fid": "FID needs a covariance", "kid": "KID's unbiased MMD needs 2 per subset",
        "prc": "precision/recall use each sample's 3rd nearest neighbour among the others", "isc": "nothing to score"}


def default_cache_root() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffguide" / "fidelity")


class Metric:
    """Scores a folder of samples. `check(num_samples)` runs before sampling: every setting a metric needs is checked
    there, so a bad one fails in one line before the long work instead of after it."""

    def check(self, num_samples: int) -> None:
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

    def check(self, num_samples):
        for name, value in self.flags.items():
            if not isinstance(value, bool):
                raise UserError(f"metric.{name}={value!r}: use true or false")
        for name, least in (("batch_size", 1), ("isc_splits", 1), ("kid_subset_size", 2)):
            value = getattr(self, name)
            # kid_subset_size and isc_splits above the sample count are fine: they are clipped to it
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise UserError(f"metric.{name}={value!r}: use an integer >= {least}"
                                + (" (a KID subset of 1 has no unbiased MMD)" if name == "kid_subset_size" else ""))
        if not isinstance(self.save_cpu_ram, bool):
            raise UserError(f"metric.save_cpu_ram={self.save_cpu_ram!r}: use true, false or null")
        if Path(self.cache_root).exists() and not Path(self.cache_root).is_dir():
            raise UserError(f"metric.cache_root={self.cache_root}: not a folder")
        self._check_sample_count(num_samples)
        if self.reference_file is not None:
            self._check_reference_file()

    def _check_sample_count(self, n: int) -> None:
        for name, on in self.flags.items():
            if on and n < _LEAST[name]:
                more = f"{_LEAST[name] - 1} sample" + ("s" if _LEAST[name] != 2 else "")
                raise UserError(f"metric.{name} needs more than {more} ({_WHY[name]}; "
                                f"num_samples={n}): set num_samples>={_LEAST[name]} or metric.{name}=false")

    def _least_reference_images(self, has_stats: bool) -> int:
        """The fewest reference images the metrics turned on need (FID needs none where the reference has mu/sigma)."""
        uses = [m for m in ("kid", "prc") if self.flags[m]] + (["fid"] if self.flags["fid"] and not has_stats else [])
        return max((_LEAST[m] for m in uses), default=0)

    def _check_reference_file(self) -> None:
        path = self.reference_file
        arrays = ReferenceFile.check(path)
        if "arr_0" in arrays:
            count, least = arrays["arr_0"][0][0], self._least_reference_images({"mu", "sigma"} <= set(arrays))
            if count < least:
                raise UserError(f"metric.reference={path}: the metrics turned on need at least {least} reference "
                                f"images; arr_0 holds {count}")

    def __call__(self, samples_dir, labels, device):
        n = len(labels)
        self._check_sample_count(n)
        # A cache write killed between its write and its rename leaves a temp file; its lock is gone with its writer.
        checkpoint.clean_stale_temps(Path(self.cache_root))
        reference = ReferenceFile(self.reference_file) if self.reference_file is not None else None
        flags = dict(self.flags)
        if reference is not None and not reference.has_images:
            flags["kid"] = flags["prc"] = False
        kwargs = dict(input1=SampleFiles(samples_dir, n), cuda=device.type == "cuda", batch_size=self.batch_size,
                      isc_splits=min(self.isc_splits, n), save_cpu_ram=self.save_cpu_ram, verbose=False,
                      cache=False, **self.fidelity_kwargs())
        layers = {m: resolve_feature_layer_for_metric(m, **kwargs) for m, on in flags.items() if on}
        if not layers:
            return {}
        stats = reference.stats if reference is not None else None  # FID against the file's own mu and sigma
        # torch-fidelity's calculate_metrics, step by step: the same extractor, features and metric functions, with
        # the reference features from diffguide's cache instead of torch-fidelity's pickles.
        with redirect_stdout(sys.stderr):  # torch-fidelity prints on stdout; keep stdout for our own report
            extractor = create_feature_extractor(kwargs["feature_extractor"], sorted(set(layers.values())), **kwargs)
            ours = extract_featuresdict_from_input_id(1, extractor, **kwargs)
            reference_layers = sorted({layers[m] for m in ("fid", "kid", "prc")
                                       if m in layers and not (m == "fid" and stats is not None)})
            theirs = self._reference_features(extractor, reference_layers, kwargs, reference) \
                if reference_layers else {}
            raw = {}
            if "isc" in layers:
                raw.update(isc_featuresdict_to_metric(ours, layers["isc"], **kwargs))
            if "fid" in layers:
                ours_stats = fid_featuresdict_to_statistics(ours, layers["fid"])
                if stats is not None:
                    raw["frechet_inception_distance"] = fid_against_statistics(stats, ours_stats,
                                                                               kwargs["feature_extractor"])
                else:
                    raw.update(fid_statistics_to_metric(
                        ours_stats, fid_featuresdict_to_statistics(theirs, layers["fid"]), False))
            if "kid" in layers:
                subset = min(self.kid_subset_size, n, len(theirs[layers["kid"]]))
                raw.update(kid_featuresdict_to_metric(ours, theirs, layers["kid"], **kwargs, kid_subset_size=subset))
            if "prc" in layers:
                raw.update(prc_featuresdict_to_metric(ours, theirs, layers["prc"], **kwargs))
        scores = {f"{_RENAME[k]}{self.suffix}": float(v) for k, v in raw.items() if k in _RENAME}
        for name, value in scores.items():
            if not math.isfinite(value):
                raise UserError(f"{name} came out {value} on {n} samples; no scores were written "
                                f"(look at the samples and the metric settings)")
        return scores

    def _reference_identity(self, reference: "ReferenceFile | None", kwargs: dict) -> str | None:
        """What names the reference set in the cache key: a registered dataset's name or the .npz file's sha256.
        None (not cached) for a folder of images, whose content has no cheap identity."""
        if reference is not None:
            return f"npz-sha256-{_file_sha256(reference.path)}"
        name = kwargs.get("input2")
        return name if isinstance(name, str) and name in DATASETS_REGISTRY else None

    def _reference_features(self, extractor, layers, kwargs, reference) -> dict[str, torch.Tensor]:
        """input2's features at `layers`, from the cache where the reference set has an identity."""

        def compute():
            inputs = {**kwargs, "input2": reference.images()} if reference is not None else kwargs
            features = extract_featuresdict_from_input_id(2, extractor, **inputs)
            return {layer: features[layer] for layer in layers}

        identity = self._reference_identity(reference, kwargs)
        if identity is None:
            return compute()
        weights = kwargs.get("feature_extractor_weights_path")
        # Everything the features depend on: the same settings can only meet features they would compute again.
        key = json.dumps({"format": 1, "torch_fidelity": torch_fidelity.__version__, "reference": identity,
                          "feature_extractor": extractor.get_name(), "layers": layers,
                          "weights": _file_sha256(weights) if weights else "torch-fidelity's download"},
                         sort_keys=True)
        label = reference.path.stem if reference is not None else identity
        cache = FeatureCache(Path(self.cache_root) / _safe_name(
            f"{label}-{extractor.get_name()}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"))
        features = cache.read(key, layers)
        if features is None:
            features = compute()
            cache.write(key, features)
        return features


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
            checkpoint.atomic_write_bytes(self.path, buffer.getvalue())
        except (OSError, checkpoint.DiskFull) as exc:  # the scores do not need the cache
            print(f"diffguide: warning: cannot cache the reference features in {self.path} ({_first_line(exc)}); "
                  f"scoring goes on without the cache", file=sys.stderr)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fid_against_statistics(stats: dict, ours: dict, feature_extractor: str) -> float:
    """FID of our statistics (mu, sigma from torch-fidelity) against a reference's precomputed ones, with
    torch-fidelity's formula."""
    theirs = {"mu": stats["mu"].astype(ours["mu"].dtype), "sigma": stats["sigma"].astype(ours["sigma"].dtype)}
    if theirs["mu"].shape != ours["mu"].shape:
        raise UserError(f"the reference statistics have {theirs['mu'].shape[0]} features, the feature extractor "
                        f"{feature_extractor} gives {ours['mu'].shape[0]}")
    return fid_statistics_to_metric(ours, theirs, False)["frechet_inception_distance"]


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

    def check(self, num_samples):
        if self.reference_file is None and str(self.reference) not in fashion_mnist.SPLITS:
            raise UserError(f"metric.reference={self.reference!r} is not a Fashion-MNIST reference: use "
                            f"{', '.join(fashion_mnist.SPLITS)}, or the path of an .npz reference batch (ADM format)")
        if not isinstance(self.class_accuracy, bool):
            raise UserError(f"metric.class_accuracy={self.class_accuracy!r}: use true or false")
        super().check(num_samples)
        evaluator_lib.load(self.evaluator_path)
        if self.reference_file is None:
            fashion_mnist.check_available(self.reference)

    def fidelity_kwargs(self):
        # The weights' digest is in the extractor's name, so retrained weights are a different extractor (in the
        # feature cache's key and file name too).
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

    def check(self, num_samples):
        if self.feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
            raise UserError(f"metric.feature_extractor={self.feature_extractor!r} is not one of torch-fidelity's "
                            f"({', '.join(FEATURE_EXTRACTORS_REGISTRY)})")
        if self.weights is not None and not Path(self.weights).is_file():
            raise UserError(f"feature extractor weights file not found: {self.weights} (metric.weights)")
        super().check(num_samples)
        if self.reference_file is None and str(self.reference) not in DATASETS_REGISTRY:
            if not Path(self.reference).is_dir():
                raise UserError(f"metric.reference={self.reference!r} is neither a torch-fidelity dataset "
                                f"({', '.join(sorted(DATASETS_REGISTRY))}), a folder of images, nor an .npz file")
            # torch-fidelity's own listing of the folder (png, jpg, jpeg; not its subfolders)
            count = len(glob_samples_paths(self.reference, False, "png,jpg,jpeg", verbose=False))
            if count < self._least_reference_images(False):
                raise UserError(f"metric.reference={self.reference}: the metrics turned on need at least "
                                f"{self._least_reference_images(False)} reference images (png, jpg or jpeg); "
                                f"the folder holds {count}")
        self._check_downloads()

    def _check_downloads(self) -> None:
        """What torch-fidelity would download while scoring (the extractor's weights, a built-in dataset) must be on
        disk, or its server reachable: else the run fails after sampling, with a download traceback."""
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        from diffguide.models.hub import reachable

        if self.weights is None:
            url = URL_INCEPTION_V3 if self.feature_extractor.startswith("inception") else "https://github.com"
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
            if not (url == URL_INCEPTION_V3 and cached.is_file()) and not reachable(url):
                raise UserError(f"metric.feature_extractor={self.feature_extractor} downloads its weights, and "
                                f"{urlparse(url).hostname} cannot be reached from here: download them where it can "
                                f"and set metric.weights=FILE")
        if self.reference_file is None and str(self.reference) in DATASETS_REGISTRY:
            root = os.path.join(torch.hub._get_torch_home(), "fidelity_datasets")  # torch-fidelity's default
            try:
                with redirect_stdout(sys.stderr):
                    DATASETS_REGISTRY[self.reference](root, False)
            except Exception:  # torchvision: "Dataset not found or corrupted" when it is not on disk
                if self.weights is not None or not reachable("https://www.cs.toronto.edu"):  # no download then
                    raise UserError(f"metric.reference={self.reference} is not in {root} and cannot be downloaded "
                                    f"here: use a folder of reference images or an .npz reference batch") from None

    def fidelity_kwargs(self):
        kwargs = {"feature_extractor": self.feature_extractor, "feature_extractor_weights_path": self.weights,
                  "datasets_download": self.weights is None}
        if self.reference_file is None:
            kwargs["input2"] = self.reference
        return kwargs
