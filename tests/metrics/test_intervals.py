"""Bootstrap intervals, paired differences and FID-infinity (diffguide/metrics/intervals.py).

The statistics each replicate computes are checked against torch-fidelity's own functions on the full sample (every
resample weight 1): metric_fid.py fid_statistics_to_metric, metric_kid.py mmd2 (unbiased), metric_isc.py
isc_features_to_metric (one split), metric_prc.py calculate_precision_recall_part. FID-infinity follows Chong &
Forsyth 2020 ("Effectively Unbiased FID and Inception Score and where to find them", Sec. 3: FID_N = FID_inf + s / N,
fitted by least squares over N, read at 1/N = 0).
"""

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kernel_poly, mmd2
from torch_fidelity.metric_prc import calculate_precision_recall_part

from diffguide.metrics import intervals as iv


def _features(seed, n=300, d=12, shift=0.3, scale=1.0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(shift, scale, (n, d)).astype(np.float32))


def test_interval_of_a_gaussian_mean_covers_the_truth_at_the_stated_rate():
    """The 95% interval of the mean of n = 100 draws of N(2, 1), over 400 independent draws, holds 2 about 95% of
    the time (binomial sd 1.1%: 0.92-0.98 is 2.7 sd either side; the bootstrap's known undercoverage at n = 100 is
    about 1%)."""
    rng = np.random.default_rng(1)
    weights = iv.counts(iv.resample(100, 1000, seed=5), 100)
    hits = 0
    for _ in range(400):
        values = rng.normal(2.0, 1.0, 100)
        low, high = iv.interval(values.mean(), iv.mean_replicates(values, weights))
        hits += low <= 2.0 <= high
    assert 0.92 <= hits / 400 <= 0.98


def test_interval_width_of_a_mean_matches_the_normal_interval():
    """For the mean, the bootstrap's spread is the standard error: width ~ 2 * 1.96 * s / sqrt(n) (within 10%)."""
    values = np.random.default_rng(2).normal(0.0, 3.0, 400)
    low, high = iv.interval(values.mean(), iv.mean_replicates(values, iv.counts(iv.resample(400, 4000), 400)))
    expected = 2 * 1.96 * values.std(ddof=1) / 20
    assert abs((high - low) - expected) < 0.1 * expected
    assert low < values.mean() < high


def test_paired_difference_of_a_point_with_itself_is_exactly_zero():
    g, r = _features(0), _features(1, shift=0.0)
    stats = _stats(g, r, np.arange(300) % 10)
    for name in stats.available():
        assert iv.paired_difference(stats, stats, name, 0.0, 200) == (0.0, 0.0, 0.0), name


def test_paired_difference_is_narrower_than_the_unpaired_spread():
    """Two methods whose samples share their noise (b = a + a small perturbation): the paired interval of the FID
    difference is far narrower than either point's own interval, and it holds the true sign."""
    g = _features(0, n=400)
    r = _features(1, n=400, shift=0.0)
    h = g + 0.05 + 0.01 * _features(3, n=400, shift=0.0)  # every feature moved away from the reference by 0.05
    a, b = _stats(g, r, np.zeros(400, int)), _stats(h, r, np.zeros(400, int))
    fid_a = iv.fid_replicates(a.features, a.ref_mu, a.ref_sigma, np.ones((1, 400)))[0]
    fid_b = iv.fid_replicates(b.features, b.ref_mu, b.ref_sigma, np.ones((1, 400)))[0]
    estimate, low, high = iv.paired_difference(b, a, "fid", fid_b - fid_a, 500)
    own_low, own_high = iv.intervals(a, {"fid": fid_a}, 500)["fid"]
    assert 0 < low < estimate < high
    assert (high - low) < 0.25 * (own_high - own_low)


def test_paired_difference_refuses_unpaired_points():
    g, r = _features(0), _features(1, shift=0.0)
    a = _stats(g, r, np.zeros(300, int))
    b = _stats(g, r, np.ones(300, int))
    with pytest.raises(ValueError, match="same samples"):
        iv.paired_difference(a, b, "fid", 0.0, 10)


def _stats(g, r, labels):
    stats = iv.PointStats(labels=np.asarray(labels))
    ref = fid_features_to_statistics(r)
    stats.features, stats.ref_mu, stats.ref_sigma = g.numpy(), ref["mu"], ref["sigma"]
    stats.kid_kernel = np.array([1.0 / g.shape[1], 1.0, 3.0])
    stats.kxy_mean = iv.kid_kernel(g.numpy(), r.numpy(), stats.kid_kernel).mean(1)
    stats.in_reference, stats.covers = iv.prc_terms(g, r)
    stats.n_reference = len(r)
    stats.logits = g.numpy()[:, :10] * 2
    stats.correct = g.numpy()[:, 0] > 0
    return stats


def test_full_sample_replicates_equal_torch_fidelity():
    """With every weight 1 each replicate is torch-fidelity's statistic on the full sample."""
    g, r = _features(0), _features(1, shift=0.0, scale=1.1)
    stats = _stats(g, r, np.zeros(300, int))
    ones = np.ones((1, 300))
    fid = fid_statistics_to_metric(fid_features_to_statistics(g), fid_features_to_statistics(r), False)
    assert iv.replicates(stats, "fid", ones)[0] == pytest.approx(fid["frechet_inception_distance"], rel=1e-6)
    kernel = dict(kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    kxx, kyy = kernel_poly(g.numpy(), g.numpy(), **kernel), kernel_poly(r.numpy(), r.numpy(), **kernel)
    kid = mmd2(kxx, kernel_poly(g.numpy(), r.numpy(), **kernel), kyy)
    reference_term = (kyy.sum() - np.trace(kyy)) / (300 * 299)  # the term no resample changes
    assert iv.replicates(stats, "kid", ones)[0] + reference_term == pytest.approx(kid, rel=1e-5)
    isc = isc_features_to_metric(torch.from_numpy(stats.logits), splits=1)["inception_score_mean"]
    assert iv.replicates(stats, "isc", ones)[0] == pytest.approx(isc, rel=1e-9)
    precision, recall = calculate_precision_recall_part(g, r, 3, 10000)
    assert iv.replicates(stats, "precision", ones)[0] == pytest.approx(precision, abs=1e-6)
    assert iv.replicates(stats, "recall", ones)[0] == pytest.approx(recall, abs=1e-6)


def test_weighted_replicate_equals_the_statistic_of_the_resampled_set():
    """A resample's weights give the statistic of the resampled set itself (FID, IS, precision; duplicates kept)."""
    g, r = _features(0), _features(1, shift=0.0)
    stats = _stats(g, r, np.zeros(300, int))
    idx = iv.resample(300, 1, seed=7)
    weights = iv.counts(idx, 300)
    drawn = g[torch.from_numpy(idx[0])]
    fid = fid_statistics_to_metric(fid_features_to_statistics(drawn), fid_features_to_statistics(r), False)
    assert iv.replicates(stats, "fid", weights)[0] == pytest.approx(fid["frechet_inception_distance"], rel=1e-6)
    isc = isc_features_to_metric(torch.from_numpy(stats.logits[idx[0]]), splits=1)["inception_score_mean"]
    assert iv.replicates(stats, "isc", weights)[0] == pytest.approx(isc, rel=1e-9)
    assert iv.replicates(stats, "precision", weights)[0] == pytest.approx(stats.in_reference[idx[0]].mean())


def test_fid_infinity_recovers_the_intercept_of_a_linear_fid():
    """FID(N) = 1.7 + 350 / N exactly: the fit in 1/N returns 1.7 and 350."""
    sizes = iv.fid_sizes(2000, 256)
    assert sizes[0] == 400 and sizes[-1] == 2000 and len(sizes) == 15
    assert iv.fid_sizes(1000, 256)[0] == 257 and len(iv.fid_sizes(200, 256)) == 0  # no singular covariances
    intercept, slope = iv.extrapolate(sizes, 1.7 + 350.0 / sizes)
    assert intercept == pytest.approx(1.7, abs=1e-9)
    assert slope == pytest.approx(350.0, rel=1e-9)


def test_fid_infinity_of_gaussian_features_heads_to_the_true_fid():
    """Samples N(m, I) in d = 8 against the exact reference statistics (0, I): the true FID is |m|^2 = 8 * 0.1^2 =
    0.08, while FID at N = 1000 carries a bias of about d(d+1)/(4N) + d/N (the sample covariance's and mean's).
    FID-infinity over nested subsets removes most of it: averaged over 20 draws, it lies within 0.01 of the truth
    where plain FID sits above it by more than 0.02."""
    d, n = 8, 1000
    inf, plain = [], []
    for seed in range(20):
        x = np.random.default_rng(seed).normal(0.1, 1.0, (n, d))
        order = np.random.default_rng(100 + seed).permutation(n)[None]
        inf.append(iv.fid_infinity(x, np.zeros(d), np.eye(d), order)[0])
        plain.append(iv.fid_replicates(x, np.zeros(d), np.eye(d), np.ones((1, n)))[0])
    assert abs(np.mean(inf) - 0.08) < 0.01
    assert np.mean(plain) - 0.08 > 0.02


def test_fid_infinity_equals_a_fit_over_subset_fids():
    """fid_infinity's running sums give the FID of each nested subset: the same intercept as fitting FIDs computed
    one subset at a time."""
    g, r = _features(0), _features(1, shift=0.0)
    ref = fid_features_to_statistics(r)
    order = np.random.default_rng(3).permutation(300)
    sizes = iv.fid_sizes(300, 12)
    fids = [fid_statistics_to_metric(fid_features_to_statistics(g[torch.from_numpy(order[:s])]), ref,
                                     False)["frechet_inception_distance"] for s in sizes]
    assert iv.fid_infinity(g.numpy(), ref["mu"], ref["sigma"], order[None])[0] == pytest.approx(
        iv.extrapolate(sizes, fids)[0], rel=1e-6)


def test_point_stats_round_trip(tmp_path):
    g, r = _features(0), _features(1, shift=0.0)
    stats = _stats(g, r, np.arange(300) % 10)
    stats.clip_score = np.linspace(20.0, 35.0, 300)  # the text metrics' per-sample scores (metrics/text.py)
    stats.pick_score = np.linspace(18.0, 22.0, 300)
    stats.save(tmp_path / "features.npz")
    back = iv.PointStats.load(tmp_path / "features.npz")
    assert back.available() == stats.available() == list(iv.NAMES)
    assert np.array_equal(back.clip_score, stats.clip_score) and np.array_equal(back.pick_score, stats.pick_score)
    assert back.n_reference == 300 and np.array_equal(back.covers, stats.covers)
