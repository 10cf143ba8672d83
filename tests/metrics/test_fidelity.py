"""torch-fidelity scoring with the project's evaluator, checked against the metrics' formulas computed here."""

import numpy as np
import pytest
import torch

from diffguide.data import fashion_mnist
from diffguide.metrics.fmnist import FashionMNISTMetrics
from diffguide.classifiers import evaluator as evaluator_lib
from diffguide.store.samples import SampleStore


@torch.no_grad()
def _features(model, images):
    out = [model.features_and_logits(images[i:i + 1000]) for i in range(0, len(images), 1000)]
    return torch.cat([f for f, _ in out]).double(), torch.cat([lg for _, lg in out]).double()


def _fid(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    # tr sqrt(A B) is the sum of the square roots of the eigenvalues of A B (real and >= 0 for PSD A, B).
    eig = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    return float((mu_a - mu_b).pow(2).sum()) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(eig).sum()


def _within_kth_ball(queries, points, k=3):
    radii = torch.cat([torch.cdist(points[i:i + 2000], points).kthvalue(k + 1, dim=1).values
                       for i in range(0, len(points), 2000)])
    return torch.cat([(torch.cdist(queries[i:i + 2000], points) <= radii).any(1)
                      for i in range(0, len(queries), 2000)]).double().mean().item()


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_evaluator_path, fidelity_cache):
    images, labels = fashion_mnist.load("test")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:300]
    store = SampleStore(tmp_path_factory.mktemp("scored"))
    store.claim({"test": True})
    wrong = labels[chosen].clone()
    wrong[:60] = (wrong[:60] + 1) % 10  # a fifth of the samples "generated for" another class
    for i, j in enumerate(chosen.tolist()):
        store.write(i, images[j].permute(1, 2, 0).numpy(), {"seed": i, "label": int(wrong[i]), "nfe": 1})
    metric = FashionMNISTMetrics(str(tiny_evaluator_path), isc_splits=1, kid_subset_size=100,
                                 cache_root=str(fidelity_cache))
    metric.check(len(wrong))
    scores = metric(store.dir, wrong.tolist(), torch.device("cpu"), stats_path=store.dir.parent / "features.npz")
    return scores, images, chosen, wrong, evaluator_lib.load(tiny_evaluator_path), store.dir


def test_fid_matches_its_formula(scored):
    scores, images, chosen, _, model, _ = scored
    fake, _ = _features(model, images[chosen])
    real, _ = _features(model, images)
    assert scores["fid_fmnist"] == pytest.approx(_fid(fake, real), rel=1e-3, abs=1e-4)


def test_inception_score_matches_its_formula(scored):
    scores, images, chosen, _, model, _ = scored
    _, logits = _features(model, images[chosen])
    p = logits.softmax(1)
    expected = torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()).item()
    assert scores["isc_fmnist"] == pytest.approx(expected, rel=1e-4)


def test_precision_recall_match_their_definition(scored):
    scores, images, chosen, _, model, _ = scored
    fake, _ = _features(model, images[chosen])
    real, _ = _features(model, images)
    assert scores["precision_fmnist"] == pytest.approx(_within_kth_ball(fake.float(), real.float()), abs=1e-6)
    assert scores["recall_fmnist"] == pytest.approx(_within_kth_ball(real.float(), fake.float()), abs=1e-6)
    assert np.isfinite(scores["kid_fmnist"])


def test_class_accuracy_counts_agreement_with_the_generated_label(scored):
    scores, images, chosen, wrong, model, _ = scored
    predicted = model(images[chosen]).argmax(1)
    assert scores["class_accuracy"] == pytest.approx((predicted == wrong).double().mean().item())


def test_real_images_score_better_than_noise(scored, tmp_path, tiny_evaluator_path, fidelity_cache):
    store = SampleStore(tmp_path)
    store.claim({"noise": True})
    rng = np.random.default_rng(0)
    for i in range(300):
        store.write(i, rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), {"seed": i, "label": i % 10, "nfe": 1})
    metric = FashionMNISTMetrics(str(tiny_evaluator_path), isc_splits=1, kid_subset_size=100,
                                 cache_root=str(fidelity_cache))
    noise = metric(store.dir, [i % 10 for i in range(300)], torch.device("cpu"))
    assert noise["fid_fmnist"] > 2 * scored[0]["fid_fmnist"]


def _npz_case(tmp_path, scored, tiny_evaluator_path, fidelity_cache, **arrays):
    scores, images, chosen, wrong, model, _ = scored
    path = tmp_path / "reference.npz"
    np.savez(path, **arrays)
    store_dir = scored[-1]
    metric = FashionMNISTMetrics(str(tiny_evaluator_path), reference=str(path), isc_splits=1, kid_subset_size=100,
                                 cache_root=str(fidelity_cache))
    metric.check(len(wrong))
    return metric(store_dir, wrong.tolist(), torch.device("cpu"))


def test_an_npz_reference_batch_of_images(scored, tmp_path, tiny_evaluator_path, fidelity_cache):
    """ADM's reference-batch format with images only (arr_0, N x H x W x 3 uint8): FID against those images."""
    scores, images, chosen, _, model, _ = scored
    arr_0 = images[:500].permute(0, 2, 3, 1).expand(-1, -1, -1, 3)  # the uint8 test images, as N x H x W x 3
    got = _npz_case(tmp_path, scored, tiny_evaluator_path, fidelity_cache, arr_0=arr_0.numpy())
    fake, _ = _features(model, images[chosen])
    real, _ = _features(model, images[:500])
    assert got["fid_fmnist"] == pytest.approx(_fid(fake, real), rel=1e-3, abs=1e-4)
    assert "kid_fmnist" in got and "precision_fmnist" in got


def test_an_npz_of_precomputed_statistics(scored, tmp_path, tiny_evaluator_path, fidelity_cache):
    """mu and sigma only (how ImageNet reference statistics are shared): FID against them; no KID or P/R."""
    scores, images, chosen, _, model, _ = scored
    real, _ = _features(model, images[:500])
    mu, sigma = real.mean(0).numpy(), np.cov(real.numpy(), rowvar=False)
    got = _npz_case(tmp_path, scored, tiny_evaluator_path, fidelity_cache, mu=mu, sigma=sigma)
    fake, _ = _features(model, images[chosen])
    assert got["fid_fmnist"] == pytest.approx(_fid(fake, real), rel=1e-3, abs=1e-4)
    assert "kid_fmnist" not in got and "precision_fmnist" not in got and "isc_fmnist" in got


def test_an_npz_without_images_or_statistics_is_refused(tmp_path, tiny_evaluator_path):
    from diffguide.errors import UserError

    np.savez(tmp_path / "bad.npz", something=np.zeros(3))
    with pytest.raises(UserError, match="arr_0"):
        FashionMNISTMetrics(str(tiny_evaluator_path), reference=str(tmp_path / "bad.npz")).check(100)


def test_dinov2_option_and_unknown_extractors(tmp_path):
    from diffguide.errors import UserError
    from diffguide.metrics.inception import InceptionMetrics

    from PIL import Image

    for i in range(4):  # a reference folder with enough images for precision/recall
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    weights = tmp_path / "weights.pth"  # check() only needs the file to be there
    weights.write_bytes(b"")
    dinov2 = InceptionMetrics(str(tmp_path), feature_extractor="dinov2-vit-l-14", weights=str(weights))
    dinov2.check(100)
    assert dinov2.flags["isc"] is False and dinov2.suffix == "_dinov2"
    assert dinov2.fidelity_kwargs()["feature_extractor"] == "dinov2-vit-l-14"
    with pytest.raises(UserError, match="not one of torch-fidelity's"):
        InceptionMetrics(str(tmp_path), feature_extractor="inception-v4").check(100)
    with pytest.raises(UserError, match="npz"):
        InceptionMetrics(str(tmp_path / "no-such-folder")).check(100)


def test_weights_that_would_download_are_checked_before_sampling(tmp_path, monkeypatch):
    """Without metric.weights torch-fidelity downloads the extractor's weights while scoring, after the sampling:
    with their server unreachable and no cached copy, check() refuses at once."""
    from diffguide.errors import UserError
    from diffguide.metrics.inception import InceptionMetrics
    from diffguide.models import hub

    from PIL import Image

    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))  # no cached weights there
    monkeypatch.setattr(hub, "reachable", lambda url, timeout=3.0: False)
    for extractor in ("inception-v3-compat", "dinov2-vit-l-14"):
        with pytest.raises(UserError, match="downloads its weights, and .* cannot be reached from here"):
            InceptionMetrics(str(tmp_path), feature_extractor=extractor).check(100)
    monkeypatch.setattr(hub, "reachable", lambda url, timeout=3.0: True)
    InceptionMetrics(str(tmp_path)).check(100)


def test_every_score_has_its_interval_and_the_features_are_kept(scored):
    """Each metric has a 95% bootstrap interval around its estimate; FID-infinity is there with its own; the
    per-sample statistics on disk give back the same intervals (the report's paired differences start from them)."""
    from diffguide.metrics import intervals

    scores, _, _, wrong, _, samples = scored
    for key in ("fid_fmnist", "kid_fmnist", "isc_fmnist", "precision_fmnist", "recall_fmnist", "class_accuracy",
                "fid_inf_fmnist"):
        assert scores[f"{key}_lo"] <= scores[key] <= scores[f"{key}_hi"], key
    assert scores["fid_fmnist_lo"] < scores["fid_fmnist"] < scores["fid_fmnist_hi"]
    assert scores["bootstrap_replicates"] == 1000
    stats = intervals.PointStats.load(samples.parent / "features.npz")
    assert stats.available() == [n for n in intervals.NAMES if n not in ("clip_score", "pick_score")]
    assert np.array_equal(stats.labels, wrong.numpy())
    assert stats.correct.mean() == scores["class_accuracy"]
    estimates = {"fid": scores["fid_fmnist"], "precision": scores["precision_fmnist"]}
    again = intervals.intervals(stats, estimates, 1000)
    # (the scoring runs its bootstrap on one thread: the sums may differ in the last digits)
    assert again["fid"] == pytest.approx((scores["fid_fmnist_lo"], scores["fid_fmnist_hi"]), rel=1e-6, abs=1e-9)
    assert again["precision"] == (scores["precision_fmnist_lo"], scores["precision_fmnist_hi"])
