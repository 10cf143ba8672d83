"""Every setting a metric needs is checked by `check(num_samples)`, before sampling, in one line; good values pass."""

import numpy as np
import pytest
import torch

from diffguide.errors import UserError
from diffguide.metrics import base
from diffguide.metrics.base import NoMetrics
from diffguide.metrics.fmnist import FashionMNISTMetrics
from diffguide.metrics.inception import InceptionMetrics


def _fmnist(small, tmp_path, **kwargs):
    return FashionMNISTMetrics(str(small.evaluator), cache_root=str(tmp_path / "cache"), **kwargs)


def _refused(metric, num_samples, match):
    with pytest.raises(UserError, match=match) as info:
        metric.check(num_samples)
    assert "\n" not in str(info.value)


def test_no_metrics_checks_nothing():
    NoMetrics().check(1)


def test_precision_recall_need_four_samples(small, tmp_path):
    _refused(_fmnist(small, tmp_path), 3, r"metric\.prc needs more than 3 sample.*num_samples>=4 or metric\.prc=false")
    _fmnist(small, tmp_path).check(4)
    _fmnist(small, tmp_path, prc=False).check(3)


def test_fid_and_kid_need_two_samples(small, tmp_path):
    _refused(_fmnist(small, tmp_path, prc=False, kid=False), 1, r"metric\.fid needs more than 1 .*num_samples>=2")
    _refused(_fmnist(small, tmp_path, prc=False, fid=False), 1, r"metric\.kid needs more than 1 .*metric\.kid=false")
    _fmnist(small, tmp_path, prc=False).check(2)
    _fmnist(small, tmp_path, prc=False, fid=False, kid=False).check(1)  # IS of one sample is defined


@pytest.mark.parametrize("key, bad, good", [("batch_size", 0, 1), ("isc_splits", 0, 1), ("kid_subset_size", 1, 2),
                                            ("batch_size", "many", 500), ("isc_splits", True, 10)])
def test_integer_settings_have_a_range(small, tmp_path, key, bad, good):
    least = 2 if key == "kid_subset_size" else 1
    _refused(_fmnist(small, tmp_path, **{key: bad}), 100, rf"metric\.{key}=.*integer >= {least}")
    _fmnist(small, tmp_path, **{key: good}).check(100)


def test_sizes_above_the_sample_count_are_clipped_not_refused(small, tmp_path):
    _fmnist(small, tmp_path, kid_subset_size=5000, isc_splits=50).check(4)


@pytest.mark.parametrize("key", ["fid", "isc", "kid", "prc", "class_accuracy", "save_cpu_ram"])
def test_switches_are_booleans(small, tmp_path, key):
    _refused(_fmnist(small, tmp_path, **{key: "maybe"}), 100, rf"metric\.{key}='maybe'")


def test_a_cache_root_that_is_a_file_is_refused(small, tmp_path):
    (tmp_path / "file").write_text("")
    _refused(FashionMNISTMetrics(str(small.evaluator), cache_root=str(tmp_path / "file")), 100, "not a folder")


def test_an_unknown_fashion_mnist_reference_lists_the_choices(small, tmp_path):
    _refused(_fmnist(small, tmp_path, reference="bogus"), 100, r"metric\.reference='bogus'.*train, test.*\.npz")
    _fmnist(small, tmp_path, reference="train").check(100)


def test_npz_references_are_checked_before_sampling(small, tmp_path):
    images = np.zeros((3, 28, 28, 3), np.uint8)
    np.savez(tmp_path / "three.npz", arr_0=images)
    _refused(_fmnist(small, tmp_path, reference=str(tmp_path / "three.npz")), 100, "at least 4 reference images")
    _fmnist(small, tmp_path, reference=str(tmp_path / "three.npz"), prc=False).check(100)
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    _refused(_fmnist(small, tmp_path, reference=str(tmp_path / "float.npz")), 100, "arr_0 must be uint8")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(8), sigma=np.eye(7))
    _refused(_fmnist(small, tmp_path, reference=str(tmp_path / "stats.npz")), 100, "sigma D x D")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    _refused(_fmnist(small, tmp_path, reference=str(tmp_path / "garbage.npz")), 100, "not a readable .npz")


def test_a_reference_folder_needs_enough_images(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    weights = tmp_path / "weights.pth"  # a local weights file: nothing to download
    weights.write_bytes(b"")
    _refused(InceptionMetrics(str(tmp_path), cache_root=str(tmp_path / "c"), weights=str(weights)), 100,
             "at least 4 reference images")
    InceptionMetrics(str(tmp_path), fid=False, kid=False, prc=False, cache_root=str(tmp_path / "c"),
                     weights=str(weights)).check(100)


def test_scoring_at_the_smallest_sample_counts_gives_finite_numbers(small, tmp_path):
    four = small.metric(tmp_path)(small.samples, small.labels[:4], torch.device("cpu"))
    assert all(np.isfinite(list(four.values()))) and "precision_fmnist" in four
    two = small.metric(tmp_path, prc=False)(small.samples, small.labels[:2], torch.device("cpu"))
    assert all(np.isfinite(list(two.values()))) and "kid_fmnist" in two


def test_scoring_refuses_too_few_samples_and_non_finite_numbers(small, tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"metric\.prc needs more than 3"):
        small.metric(tmp_path)(small.samples, small.labels[:3], torch.device("cpu"))
    monkeypatch.setattr(base, "fid_statistics_to_metric",
                        lambda *args: {"frechet_inception_distance": float("nan")})
    with pytest.raises(UserError, match="fid_fmnist came out nan on 40 samples"):
        small.score(tmp_path)
