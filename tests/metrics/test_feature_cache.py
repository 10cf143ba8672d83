"""diffguide's cache of reference features: torch-fidelity's numbers, no pickles, and damage that costs one warning
line and a recomputation instead of every later run."""

import fcntl
import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch_fidelity
from torch_fidelity.registry import DATASETS_REGISTRY

from diffguide.store import atomic
from diffguide.store import checkpoint
from diffguide.data import fashion_mnist
from diffguide.metrics.base import SampleFiles
from diffguide.metrics.inception import InceptionMetrics
from diffguide.metrics.reference import FeatureCache, ReferenceFile, _ArrayImages

KEYS = {"frechet_inception_distance": "fid", "inception_score_mean": "isc", "inception_score_std": "isc_std",
        "kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std",
        "precision": "precision", "recall": "recall", "f_score": "f_score"}


def _tiny_dataset_metric(small, cache_root):
    """A registered torch-fidelity dataset as the reference (the other kind the cache names), kept small."""
    if "diffguide-test-tiny" not in DATASETS_REGISTRY:
        images = fashion_mnist.load("test")[0][2000:2100].permute(0, 2, 3, 1).numpy()
        torch_fidelity.register_dataset("diffguide-test-tiny", lambda root, download: _ArrayImages(images))
    extractor = small.metric(cache_root).fidelity_kwargs()["feature_extractor"]  # registers the evaluator
    return InceptionMetrics("diffguide-test-tiny", weights=str(small.evaluator), feature_extractor=extractor,
                            isc_splits=2, kid_subset_size=20, cache_root=str(cache_root))


@pytest.mark.parametrize("reference", ["npz", "registered dataset"])
def test_scores_equal_torch_fidelitys_calculate_metrics(small, tmp_path, reference):
    metric = small.metric(tmp_path) if reference == "npz" else _tiny_dataset_metric(small, tmp_path)
    metric.check(len(small.labels))
    first = metric(small.samples, small.labels, torch.device("cpu"))  # computes the reference features
    second = metric(small.samples, small.labels, torch.device("cpu"))  # reads them from the cache
    kwargs = metric.fidelity_kwargs()
    if reference == "npz":
        kwargs["input2"] = ReferenceFile(small.reference).images()
    expected = torch_fidelity.calculate_metrics(
        input1=SampleFiles(small.samples, len(small.labels)), cuda=False, batch_size=metric.batch_size, isc=True,
        fid=True, kid=True, prc=True, isc_splits=2, kid_subset_size=20, save_cpu_ram=metric.save_cpu_ram,
        verbose=False, cache=False, **kwargs)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    for theirs, ours in KEYS.items():
        assert first[ours + metric.suffix] == pytest.approx(expected[theirs], rel=1e-6, abs=1e-9), ours
        assert second[ours + metric.suffix] == pytest.approx(expected[theirs], rel=1e-6, abs=1e-9), ours


@pytest.fixture(scope="module")
def clean(small, tmp_path_factory):
    """The scores of a run that computes its reference features, and the cache file it leaves."""
    cache = tmp_path_factory.mktemp("clean-cache")
    scores = small.score(cache)
    (path,) = cache.glob("*.npz")
    return scores, path


def _damage(path, how, marker):
    blob = path.read_bytes()
    if how == "truncated":
        path.write_bytes(blob[:len(blob) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(len(blob)))
    elif how == "digest mismatch":
        with np.load(path) as data:
            arrays = dict(data)
        arrays["features_features"] = arrays["features_features"] + 1  # sha256 left as it was
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    elif how == "wrong keys":
        with np.load(path) as data:
            arrays = {k: v for k, v in data.items() if k != "features_features"}
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    elif how == "a pickle":  # what torch-fidelity's cache loads, and runs, with weights_only=False
        class Planted:
            def __reduce__(self):
                return open, (str(marker), "w")
        path.write_bytes(pickle.dumps(Planted()))


@pytest.mark.parametrize("how", ["truncated", "garbage", "digest mismatch", "wrong keys", "a pickle"])
def test_a_damaged_cache_file_costs_one_warning_and_a_recomputation(small, clean, tmp_path, capsys, how):
    scores, clean_path = clean
    path = tmp_path / clean_path.name
    path.write_bytes(clean_path.read_bytes())
    _damage(path, how, tmp_path / "ran")
    capsys.readouterr()
    assert small.score(tmp_path) == pytest.approx(scores, rel=1e-9)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(path) in warnings[0] and "damaged" in warnings[0], warnings
    assert warnings[0].startswith("diffguide: warning: the cached reference features")
    assert warnings[0].endswith("recomputing them")
    assert not (tmp_path / "ran").exists()
    with np.load(path, allow_pickle=False) as data:  # rewritten whole
        assert set(data.files) == {"key", "sha256", "features_features", "features_features@knn3"}
    assert small.score(tmp_path) == pytest.approx(scores, rel=1e-9)
    assert "warning" not in capsys.readouterr().err


def test_the_cache_file_is_an_npz_keyed_by_everything_its_features_depend_on(small, clean):
    _, path = clean
    assert path.read_bytes()[:2] == b"PK"  # a zip of .npy arrays, not a pickle
    with np.load(path, allow_pickle=False) as data:
        arrays = dict(data)
    assert arrays["sha256"].item() == FeatureCache.digest(arrays)
    assert arrays["features_features"].shape[0] == 120 and arrays["features_features"].dtype == np.float32
    key = json.loads(arrays["key"].item())
    extractor = small.metric(path.parent).fidelity_kwargs()["feature_extractor"]
    assert key["feature_extractor"] == extractor and checkpoint.file_digest(small.evaluator) in extractor
    assert key["weights"] == hashlib.sha256(small.evaluator.read_bytes()).hexdigest()
    assert key["reference"] == f"npz-sha256-{hashlib.sha256(small.reference.read_bytes()).hexdigest()}"
    # the reference images' k-NN radii (precision's balls) are kept beside their features, as (M, 1)
    assert key["layers"] == ["features", "features@knn3"] and key["torch_fidelity"] == torch_fidelity.__version__
    assert arrays["features_features@knn3"].shape == (120, 1)


def test_another_reference_file_is_another_cache_entry(small, clean, tmp_path):
    _, path = clean
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / path.name).write_bytes(path.read_bytes())
    with np.load(small.reference) as data:
        arr_0 = data["arr_0"][:100]  # the same file name, other images
    reference = tmp_path / small.reference.name
    np.savez(reference, arr_0=arr_0)
    small.metric(cache, reference=str(reference))(small.samples, small.labels, torch.device("cpu"))
    assert len(list(cache.glob("*.npz"))) == 2


def test_scoring_removes_dead_writers_temp_files_only(small, clean, tmp_path):
    _, path = clean
    (tmp_path / path.name).write_bytes(path.read_bytes())
    stale = tmp_path / ".x.npz.abcd.tmp"
    stale.write_bytes(b"half a file")
    live = tmp_path / ".y.npz.ef01.tmp"
    live.write_bytes(b"being written")
    with open(live, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # as atomic_write_bytes holds its temp file until the rename
        small.score(tmp_path)
        assert not stale.exists() and live.exists()


def test_a_cache_that_cannot_be_written_costs_one_warning(small, clean, tmp_path, monkeypatch, capsys):
    scores, _ = clean

    def full(path, data):
        raise atomic.DiskFull(f"no space left on the device of {path.parent}")

    monkeypatch.setattr(atomic, "atomic_write_bytes", full)
    capsys.readouterr()
    assert small.score(tmp_path) == pytest.approx(scores, rel=1e-9)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "cannot cache" in warnings[0] and "no space left" in warnings[0]


def test_torch_fidelitys_own_cache_is_never_written(small, clean, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    metric = _tiny_dataset_metric(small, tmp_path / "cache")  # a registered dataset: torch-fidelity would cache it
    metric(small.samples, small.labels, torch.device("cpu"))
    assert not list(tmp_path.rglob("*.pt")) and len(list(tmp_path.rglob("*.npz"))) == 1
