"""Sample-quality metrics through torch-fidelity: FID, IS, KID, precision/recall (the metric groups' shared part).

torch-fidelity extracts the features and computes every statistic from them with its own functions; a metric
(`fmnist`, `inception`) names the feature extractor and the reference set it should use, diffguide keeps the
reference set's features in its own cache (see `reference.FeatureCache`; torch-fidelity's cache is a pickle and is
never read or written), and the results are named for what they are (`fid_fmnist` is not Inception FID).
"""

import hashlib
import json
import math
import os
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.registry import DATASETS_REGISTRY
from torch_fidelity.utils import (create_feature_extractor, extract_featuresdict_from_input_id,
                                  resolve_feature_layer_for_metric)

from diffguide.store import atomic
from diffguide.errors import UserError
from diffguide.metrics import intervals
from diffguide.metrics.reference import FeatureCache, ReferenceFile
from diffguide.store.samples import sample_path

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

    def __call__(self, samples_dir: Path, labels: list[int], device: torch.device,
                 stats_path: Path | None = None, prompts: list[str] | None = None) -> dict[str, float]:
        """The scores of samples 0..len(labels)-1 in `samples_dir`; `prompts`: each sample's prompt (text models)."""
        return {}


class NoMetrics(Metric):
    pass


class FidelityMetric(Metric):
    def __init__(self, fid=True, isc=True, kid=True, prc=True, batch_size=500, kid_subset_size=1000, isc_splits=10,
                 cache_root=None, save_cpu_ram=None, bootstrap=1000, fid_inf=True, fid_inf_bootstrap=100, suffix=""):
        self.flags = {"fid": fid, "isc": isc, "kid": kid, "prc": prc}
        self.batch_size, self.kid_subset_size, self.isc_splits = batch_size, kid_subset_size, isc_splits
        # intervals (see metrics/intervals.py): bootstrap replicates of every metric (0: none), FID-infinity and the
        # replicates of its interval (each refits FID at 15 subset sizes, so fewer)
        self.bootstrap, self.fid_inf, self.fid_inf_bootstrap = bootstrap, fid_inf, fid_inf_bootstrap
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
        for name, value in {**self.flags, "fid_inf": self.fid_inf}.items():
            if not isinstance(value, bool):
                raise UserError(f"metric.{name}={value!r}: use true or false")
        for name, least in (("batch_size", 1), ("isc_splits", 1), ("kid_subset_size", 2), ("bootstrap", 0),
                            ("fid_inf_bootstrap", 0)):
            value = getattr(self, name)
            # kid_subset_size and isc_splits above the sample count are fine: they are clipped to it
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise UserError(f"metric.{name}={value!r}: use an integer >= {least}"
                                + (" (a KID subset of 1 has no unbiased MMD)" if name == "kid_subset_size" else "")
                                + (" (0: no intervals)" if "bootstrap" in name else ""))
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

    def __call__(self, samples_dir, labels, device, stats_path: Path | None = None, prompts=None):
        """The scores, each with its bootstrap interval (`NAME_lo`, `NAME_hi`), and FID-infinity; `stats_path`: where
        to keep the per-sample statistics (features.npz) that paired differences are computed from later."""
        scores, stats = self.score(samples_dir, labels, device)
        with intervals.one_thread():
            return self._with_intervals(scores, stats, len(labels), stats_path)

    def _with_intervals(self, scores: dict, stats: intervals.PointStats, n: int, stats_path: Path | None) -> dict:
        estimates = {name: scores[key] for name in intervals.NAMES
                     for key in (f"{name}{self.suffix}", name) if key in scores}
        if self.bootstrap and n >= 2:
            for name, (low, high) in intervals.intervals(stats, estimates, self.bootstrap).items():
                key = f"{name}{self.suffix}" if f"{name}{self.suffix}" in scores else name
                scores[f"{key}_lo"], scores[f"{key}_hi"] = low, high
            scores["bootstrap_replicates"] = self.bootstrap
        if self.fid_inf and stats.ref_sigma is not None and len(intervals.fid_sizes(n, len(stats.ref_mu))) >= 3:
            args = (stats.features, stats.ref_mu, stats.ref_sigma)
            key = f"fid_inf{self.suffix}"
            scores[key] = float(intervals.fid_infinity(*args, np.random.default_rng(0).permutation(n)[None])[0])
            if self.fid_inf_bootstrap:
                scores[f"{key}_lo"], scores[f"{key}_hi"] = intervals.interval(
                    scores[key], intervals.fid_infinity(*args, intervals.resample(n, self.fid_inf_bootstrap)))
        if stats_path is not None:
            stats.save(stats_path)
        return scores

    def score(self, samples_dir, labels, device) -> tuple[dict[str, float], intervals.PointStats]:
        """torch-fidelity's scores of the samples, and the per-sample statistics their intervals need."""
        n = len(labels)
        self._check_sample_count(n)
        # A cache write killed between its write and its rename leaves a temp file; its lock is gone with its writer.
        atomic.clean_stale_temps(Path(self.cache_root))
        reference = ReferenceFile(self.reference_file) if self.reference_file is not None else None
        flags = dict(self.flags)
        if reference is not None and not reference.has_images:
            flags["kid"] = flags["prc"] = False
        kwargs = dict(input1=SampleFiles(samples_dir, n), cuda=device.type == "cuda", batch_size=self.batch_size,
                      isc_splits=min(self.isc_splits, n), save_cpu_ram=self.save_cpu_ram, verbose=False,
                      cache=False, **self.fidelity_kwargs())
        layers = {m: resolve_feature_layer_for_metric(m, **kwargs) for m, on in flags.items() if on}
        stats = intervals.PointStats(labels=np.asarray(labels))
        if not layers:
            return {}, stats
        # FID against the file's own mu and sigma where it has them
        reference_stats = reference.stats if reference is not None else None
        # torch-fidelity's calculate_metrics, step by step: the same extractor, features and metric functions, with
        # the reference features from diffguide's cache instead of torch-fidelity's pickles.
        with redirect_stdout(sys.stderr):  # torch-fidelity prints on stdout; keep stdout for our own report
            extractor = create_feature_extractor(kwargs["feature_extractor"], sorted(set(layers.values())), **kwargs)
            ours = extract_featuresdict_from_input_id(1, extractor, **kwargs)
            reference_layers = sorted({layers[m] for m in ("fid", "kid", "prc")
                                       if m in layers and not (m == "fid" and reference_stats is not None)})
            theirs = self._reference_features(extractor, reference_layers, kwargs, reference, layers.get("prc")) \
                if reference_layers else {}
            raw = {}
            if "isc" in layers:
                raw.update(isc_featuresdict_to_metric(ours, layers["isc"], **kwargs))
            if "fid" in layers:
                ours_stats = fid_featuresdict_to_statistics(ours, layers["fid"])
                if reference_stats is not None:
                    raw["frechet_inception_distance"] = fid_against_statistics(reference_stats, ours_stats,
                                                                               kwargs["feature_extractor"])
                    theirs_stats = reference_stats
                else:
                    theirs_stats = fid_featuresdict_to_statistics(theirs, layers["fid"])
                    raw.update(fid_statistics_to_metric(ours_stats, theirs_stats, False))
                stats.features = ours[layers["fid"]].numpy()
                stats.ref_mu = np.asarray(theirs_stats["mu"], np.float64)
                stats.ref_sigma = np.asarray(theirs_stats["sigma"], np.float64)
            if "kid" in layers:
                subset = min(self.kid_subset_size, n, len(theirs[layers["kid"]]))
                raw.update(kid_featuresdict_to_metric(ours, theirs, layers["kid"], **kwargs, kid_subset_size=subset))
                if stats.features is None or layers.get("fid") == layers["kid"]:
                    # torch-fidelity's default kernel: (x.y / D + 1)^3
                    stats.features = ours[layers["kid"]].numpy()
                    stats.kid_kernel = np.array([1.0 / stats.features.shape[1], 1.0, 3.0])
                    stats.kxy_mean = np.concatenate([
                        intervals.kid_kernel(part, theirs[layers["kid"]].numpy(), stats.kid_kernel).mean(1)
                        for part in np.array_split(stats.features, max(1, n // 1000))])
            if "prc" in layers:
                # torch-fidelity's precision/recall (k = 3), from per-sample terms that give the same two numbers
                # (tests/metrics/test_intervals.py) and the bootstrap its resamples; the reference radii are cached.
                stats.in_reference, stats.covers = intervals.prc_terms(
                    ours[layers["prc"]], theirs[layers["prc"]], _K, theirs[_radii_name(layers["prc"])][:, 0])
                stats.n_reference = len(theirs[layers["prc"]])
                precision = float(stats.in_reference.mean())
                recall = len(np.unique(stats.covers[1])) / stats.n_reference
                raw.update(precision=precision, recall=recall,
                           f_score=2 * precision * recall / max(1e-5, precision + recall))  # torch-fidelity's
            if "isc" in layers:
                stats.logits = ours[layers["isc"]].numpy()
        scores = {f"{_RENAME[k]}{self.suffix}": float(v) for k, v in raw.items() if k in _RENAME}
        for name, value in scores.items():
            if not math.isfinite(value):
                raise UserError(f"{name} came out {value} on {n} samples; no scores were written "
                                f"(look at the samples and the metric settings)")
        return scores, stats

    def _reference_identity(self, reference: "ReferenceFile | None", kwargs: dict) -> str | None:
        """What names the reference set in the cache key: a registered dataset's name or the .npz file's sha256.
        None (not cached) for a folder of images, whose content has no cheap identity."""
        if reference is not None:
            return f"npz-sha256-{_file_sha256(reference.path)}"
        name = kwargs.get("input2")
        return name if isinstance(name, str) and name in DATASETS_REGISTRY else None

    def _reference_features(self, extractor, layers, kwargs, reference, radii_layer=None) -> dict[str, torch.Tensor]:
        """input2's features at `layers`, from the cache where the reference set has an identity; with
        `radii_layer`, also each reference image's k-NN radius there (precision's balls, as (M, 1) `LAYER@knnK`)."""

        def compute():
            inputs = {**kwargs, "input2": reference.images()} if reference is not None else kwargs
            features = extract_featuresdict_from_input_id(2, extractor, **inputs)
            out = {layer: features[layer] for layer in layers}
            if radii_layer is not None:
                out[_radii_name(radii_layer)] = intervals.knn_radii(features[radii_layer], _K)[:, None]
            return out

        stored = [*layers, _radii_name(radii_layer)] if radii_layer is not None else layers

        identity = self._reference_identity(reference, kwargs)
        if identity is None:
            return compute()
        weights = kwargs.get("feature_extractor_weights_path")
        # Everything the features depend on: the same settings can only meet features they would compute again.
        key = json.dumps({"format": 1, "torch_fidelity": torch_fidelity.__version__, "reference": identity,
                          "feature_extractor": extractor.get_name(), "layers": stored,
                          "weights": _file_sha256(weights) if weights else "torch-fidelity's download"},
                         sort_keys=True)
        label = reference.path.stem if reference is not None else identity
        cache = FeatureCache(Path(self.cache_root) / _safe_name(
            f"{label}-{extractor.get_name()}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"))
        features = cache.read(key, stored)
        if features is None:
            features = compute()
            cache.write(key, features)
        return features


#: precision/recall's neighbourhood: torch-fidelity's default prc_neighborhood
_K = 3


def _radii_name(layer: str) -> str:
    return f"{layer}@knn{_K}"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fid_against_statistics(stats: dict, ours: dict, feature_extractor: str) -> float:
    """FID of our statistics (mu, sigma from torch-fidelity) against a reference's precomputed ones, with
    torch-fidelity's formula."""
    theirs = {"mu": stats["mu"].astype(ours["mu"].dtype), "sigma": stats["sigma"].astype(ours["sigma"].dtype)}
    if theirs["mu"].shape != ours["mu"].shape:
        raise UserError(f"the reference statistics have {theirs['mu'].shape[0]} features, the feature extractor "
                        f"{feature_extractor} gives {ours['mu'].shape[0]}")
    return fid_statistics_to_metric(ours, theirs, False)["frechet_inception_distance"]


class SampleFiles(torch.utils.data.Dataset):
    """samples/000000.png ... samples/{n-1}.png as uint8 RGB tensors: exactly the requested samples, even where the
    folder holds more from an earlier, larger run."""

    def __init__(self, samples_dir, count: int):
        self.dir, self.count = Path(samples_dir), count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        pixels = np.array(Image.open(sample_path(self.dir, i)).convert("RGB"))
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
