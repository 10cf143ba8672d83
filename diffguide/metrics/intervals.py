"""Bootstrap intervals, paired differences and FID-infinity from a point's per-sample features.

A point's sample-level statistics (`PointStats`: the generated samples' evaluator features and logits, and for each
sample what precision, recall, KID and class accuracy take from it) are computed once while scoring and kept in the
run folder (`features.npz`), so every interval and every paired difference is arithmetic on them: no network is
evaluated again. torch-fidelity computes the point estimates; it exposes no per-sample terms and no resampling, so
the replicates below are written here, each checked against torch-fidelity's value on the full sample (tests).

The bootstrap resamples the generated samples (with replacement, `replicates` times, a fixed seed, so every point of
the same size draws the same index sets: paired); the reference set and its statistics stay fixed. The interval is
the percentile interval of the replicates recentred on the estimate (estimate + quantiles of replicate - mean of the
replicates): resampling with replacement repeats samples, which adds FID's (and recall's) own small-sample bias to
every replicate; the recentring keeps the spread and drops that shift. It is an interval for the statistic at this
sample count N; FID-infinity (Chong & Forsyth 2020) says where FID heads as N grows.
"""

import math
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from diffguide.store import atomic

LEVEL = 0.95
#: the arrays of `PointStats` with one row per generated sample
_PER_SAMPLE = ("features", "kxy_mean", "in_reference", "logits", "correct", "clip_score", "pick_score")
NAMES = ("fid", "kid", "isc", "precision", "recall", "class_accuracy", "clip_score", "pick_score")
#: the statistics that are a mean of one number per sample: the field of PointStats holding it
_MEANS = {"precision": "in_reference", "class_accuracy": "correct", "clip_score": "clip_score",
          "pick_score": "pick_score"}


@dataclass
class PointStats:
    """What each metric needs from a point's samples, per sample. Fields a metric does not use stay None."""

    labels: np.ndarray                      # (N,) the class each sample was generated for
    features: np.ndarray | None = None      # (N, D) FID/KID features
    ref_mu: np.ndarray | None = None        # (D,) reference statistics of FID
    ref_sigma: np.ndarray | None = None     # (D, D)
    kxy_mean: np.ndarray | None = None      # (N,) mean KID kernel of each sample to the reference features
    kid_kernel: np.ndarray | None = None    # (gamma, coef0, degree) of KID's polynomial kernel
    in_reference: np.ndarray | None = None  # (N,) precision: inside some reference sample's k-NN ball
    covers: np.ndarray | None = None        # (2, P) recall: (sample, reference image) pairs, image in the sample's ball
    n_reference: int | None = None          # reference images recall averages over
    logits: np.ndarray | None = None        # (N, C) IS logits
    correct: np.ndarray | None = None       # (N,) class accuracy: the evaluator agrees with the label
    clip_score: np.ndarray | None = None    # (N,) 100 cos(CLIP image, CLIP prompt) of each sample
    pick_score: np.ndarray | None = None    # (N,) PickScore's logit_scale cos(image, prompt) of each sample

    def __len__(self):
        return len(self.labels)

    def save(self, path: Path) -> None:
        arrays = {f.name: np.asarray(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}
        atomic.atomic_write_bytes(Path(path), _npz_bytes(arrays))

    @classmethod
    def load(cls, path: Path) -> "PointStats":
        """The statistics `save` wrote; a file that is not a whole one of them (damaged, truncated, holding pickled
        objects, unknown or ragged arrays) is a ValueError that says why. Nothing in it is unpickled."""
        try:
            with np.load(path, allow_pickle=False) as data:
                values = {name: data[name] for name in data.files}
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"not a whole features file ({why})") from None
        known = {f.name for f in fields(cls)}
        if "labels" not in values or set(values) - known:
            raise ValueError(f"not a features file (arrays {', '.join(sorted(values)) or 'none'})")
        for name, value in values.items():
            if value.dtype.kind not in "biuf":
                raise ValueError(f"array {name} holds {value.dtype} values, not numbers")
        n = len(values["labels"]) if values["labels"].ndim == 1 else -1
        ragged = [name for name in _PER_SAMPLE if name in values and (values[name].ndim < 1 or len(values[name]) != n)]
        if n < 0 or ragged:
            raise ValueError(f"array {(ragged or ['labels'])[0]} does not have one row per sample")
        if "n_reference" in values:
            values["n_reference"] = int(values["n_reference"])
        return cls(**values)

    def available(self) -> list[str]:
        need = {"fid": self.ref_sigma, "kid": self.kxy_mean, "isc": self.logits, "precision": self.in_reference,
                "recall": self.covers, "class_accuracy": self.correct, "clip_score": self.clip_score,
                "pick_score": self.pick_score}
        return [name for name in NAMES if need[name] is not None]


#: words after a statistic's name that make another column: its bounds, its spread, FID-infinity
_NOT_A_SUFFIX = {"lo", "hi", "std", "inf"}


def t_interval(values) -> tuple[float, float, float]:
    """(mean, low, high): the mean of two or more values and its 95% Student-t interval."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    half = float(t.ppf(0.975, len(x) - 1)) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def is_column(name: str, key: str) -> bool:
    """Whether `key` is statistic `name`'s own column: the name itself (Inception metrics) or the name and a metric's
    one-word suffix (fid_fmnist, fid_dinov2); not a bound (_lo, _hi), a spread (isc_std_...) or FID-infinity."""
    rest = key[len(name) + 1:]
    return key == name or (key.startswith(name + "_") and "_" not in rest and rest not in _NOT_A_SUFFIX)


def _npz_bytes(arrays: dict) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@contextmanager
def one_thread():
    """torch on one thread for the bootstrap's many small eigendecompositions: one thread does them about as fast,
    and with another process on the same cores OpenMP's waiting threads spin (measured here: 10-20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def resample(n: int, replicates: int, seed: int = 0) -> np.ndarray:
    """(replicates, n) indices drawn with replacement: the same for every point of size n (paired resamples)."""
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(replicates, n) how often each sample is drawn in each resample."""
    weights = np.zeros((len(indices), n))
    np.add.at(weights, (np.arange(len(indices))[:, None], indices), 1.0)
    return weights


def interval(estimate: float, replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The recentred percentile interval (module docstring)."""
    shift = np.asarray(replicates, dtype=np.float64) - np.mean(replicates)
    low, high = np.quantile(shift, [(1 - level) / 2, (1 + level) / 2])
    return float(estimate + low), float(estimate + high)


# --- each statistic as a function of resample weights (replicates, N); with all weights 1, the full-sample value ---

def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def fid_replicates(features: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, weights: np.ndarray,
                   chunk: int = 16) -> np.ndarray:
    """FID of each weighted resample against fixed reference statistics, as torch-fidelity computes it
    (|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), S1 the unbiased covariance). tr sqrt(S1 S2) is the sum of the
    square roots of the eigenvalues of R S1 R with R = S2^(1/2), a symmetric matrix, so a batched eigvalsh does it."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float64))
    root = torch.from_numpy(_sqrt_psd(np.asarray(ref_sigma, dtype=np.float64)))
    z = x @ root
    mu2 = torch.from_numpy(np.asarray(ref_mu, dtype=np.float64))
    trace2 = float(np.trace(ref_sigma))
    square_norms = (x * x).sum(1)
    out = []
    for start in range(0, len(weights), chunk):
        w = torch.from_numpy(np.asarray(weights[start:start + chunk], dtype=np.float64))
        n = w.sum(1, keepdim=True)
        mu1 = (w @ x) / n
        nu = (w @ z) / n
        weighted = z[None] * w.sqrt()[:, :, None]
        scatter = weighted.transpose(1, 2) @ weighted
        middle = (scatter - n[:, :, None] * nu[:, :, None] * nu[:, None, :]) / (n[:, :, None] - 1)
        trace1 = ((w @ square_norms)[:, None] - n * (mu1 * mu1).sum(1, keepdim=True))[:, 0] / (n[:, 0] - 1)
        covmean = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum(1)
        diff = ((mu1 - mu2) ** 2).sum(1)
        out.append((diff + trace1 + trace2 - 2 * covmean).numpy())
    return np.concatenate(out)


def kid_kernel(a: np.ndarray, b: np.ndarray, kernel) -> np.ndarray:
    gamma, coef0, degree = kernel
    return (np.asarray(a, np.float64) @ np.asarray(b, np.float64).T * gamma + coef0) ** degree


def kid_replicates(features: np.ndarray, kxy_mean: np.ndarray, kernel, weights: np.ndarray) -> np.ndarray:
    """The unbiased MMD^2 of each resample against the reference features (torch-fidelity's `mmd2`, on all samples
    at once), less its reference-only term, which no resample changes (it cancels in every interval and difference)."""
    k = kid_kernel(features, features, kernel)
    n = weights.sum(1)
    within = (np.einsum("bi,ij,bj->b", weights, k, weights) - weights @ np.diag(k)) / (n * (n - 1))
    return within - 2 * (weights @ kxy_mean) / n


def isc_replicates(logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Inception score of each resample as one split: exp(E[KL(p(y|x) || p(y))]) with p(y) the resample's mean."""
    logp = torch.from_numpy(np.asarray(logits, np.float64)).log_softmax(1).numpy()
    p = np.exp(logp)
    n = weights.sum(1, keepdims=True)
    marginal = weights @ p / n
    return np.exp((weights @ (p * logp).sum(1)) / n[:, 0] - (marginal * np.log(marginal)).sum(1))


def recall_replicates(covers: np.ndarray, n_samples: int, n_reference: int, weights: np.ndarray) -> np.ndarray:
    """Recall of each resample: the share of reference images inside the k-NN ball of a sample drawn in it (each
    sample keeps the ball radius it has among all generated samples; a sample drawn twice is one ball)."""
    from scipy.sparse import csr_matrix

    rows, cols = covers
    matrix = csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_samples, n_reference))
    drawn = (weights > 0).astype(np.float32)
    covered = np.asarray((matrix.T @ drawn.T).T)  # (replicates, n_reference) balls that hold each image
    return (covered > 0).sum(1) / n_reference


def mean_replicates(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return weights @ np.asarray(values, np.float64) / weights.sum(1)


def replicates(stats: PointStats, name: str, weights: np.ndarray) -> np.ndarray:
    if name == "fid":
        return fid_replicates(stats.features, stats.ref_mu, stats.ref_sigma, weights)
    if name == "kid":
        return kid_replicates(stats.features, stats.kxy_mean, stats.kid_kernel, weights)
    if name == "isc":
        return isc_replicates(stats.logits, weights)
    if name in _MEANS:
        return mean_replicates(getattr(stats, _MEANS[name]), weights)
    if name == "recall":
        return recall_replicates(stats.covers, len(stats), stats.n_reference, weights)
    raise ValueError(name)


def intervals(stats: PointStats, estimates: dict[str, float], replicate_count: int, seed: int = 0,
              level: float = LEVEL) -> dict[str, tuple[float, float]]:
    """name -> (low, high) for each statistic in `estimates` (keyed as NAMES) the point has per-sample terms for."""
    weights = counts(resample(len(stats), replicate_count, seed), len(stats))
    out = {}
    for name in stats.available():
        if name in estimates:
            low, high = interval(estimates[name], replicates(stats, name, weights), level)
            # the recentring can step past a statistic's range: a share stays in [0, 1], FID and IS above 0
            low, high = max(low, _RANGE[name][0]), min(high, _RANGE[name][1])
            out[name] = (low, high)
    return out


_RANGE = {"fid": (0.0, np.inf), "kid": (-np.inf, np.inf), "isc": (1.0, np.inf), "precision": (0.0, 1.0),
          "recall": (0.0, 1.0), "class_accuracy": (0.0, 1.0), "clip_score": (-100.0, 100.0),
          "pick_score": (-np.inf, np.inf)}


def paired_difference(a: PointStats, b: PointStats, name: str, estimate: float, replicate_count: int,
                      seed: int = 0, level: float = LEVEL) -> tuple[float, float, float]:
    """(estimate, low, high) of statistic `name` of a minus that of b, over resamples of the sample indices both
    share (sample i of a and of b started from the same seed and label). `estimate`: a's minus b's point values."""
    if len(a) != len(b) or not np.array_equal(a.labels, b.labels):
        raise ValueError("paired differences need the same samples' labels (same seed, same num_samples)")
    weights = counts(resample(len(a), replicate_count, seed), len(a))
    low, high = interval(estimate, replicates(a, name, weights) - replicates(b, name, weights), level)
    return float(estimate), low, high


def knn_radii(features: torch.Tensor, k: int, batch: int = 2000) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point (torch-fidelity: kthvalue(k + 1) of the distances,
    the point itself being the first)."""
    return torch.cat([torch.cdist(part, features).kthvalue(k + 1, dim=1).values for part in features.split(batch)])


def prc_terms(generated: torch.Tensor, reference: torch.Tensor, k: int = 3, radius_ref: torch.Tensor | None = None,
              batch: int = 2000):
    """torch-fidelity's precision/recall (calculate_precision_recall_part, in its float32), per sample: (in_reference
    (N,) bool: the sample lies in some reference image's k-NN ball; covers (2, P): (sample, image) pairs where the
    image lies in the sample's k-NN ball among the generated samples). precision = in_reference.mean(); recall = the
    share of images in some pair. `radius_ref`: the reference images' k-NN radii, where already known."""
    radius_gen = knn_radii(generated, k, batch)
    radius_ref = knn_radii(reference, k, batch) if radius_ref is None else radius_ref
    inside, pairs = [], []
    for start in range(0, len(generated), batch):
        distances = torch.cdist(generated[start:start + batch], reference)
        inside.append((distances <= radius_ref[None]).any(1))
        rows, cols = torch.nonzero(distances <= radius_gen[start:start + batch, None], as_tuple=True)
        pairs.append(torch.stack([rows + start, cols]))
    return torch.cat(inside).numpy(), torch.cat(pairs, 1).numpy().astype(np.int64)


# --- FID-infinity ---

def fid_sizes(n: int, dims: int = 1, points: int = 15, smallest: float = 0.2) -> np.ndarray:
    """The subset sizes FID-infinity fits over: `points` sizes evenly spaced from `smallest` * n to n (Chong &
    Forsyth's code: np.linspace(min_fake, num_images, num_points), 5000 to 50000 in their setting), none below
    dims + 1 (a covariance of fewer samples than features is singular: FID's 1/N law does not hold there)."""
    return np.unique(np.linspace(max(2, int(smallest * n), dims + 1), n, points).astype(int)) if n > dims else \
        np.array([], dtype=int)


def extrapolate(sizes: np.ndarray, fids: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line FID = intercept + slope / N: FID-infinity is the intercept."""
    slope, intercept = np.polyfit(1.0 / np.asarray(sizes, np.float64), np.asarray(fids, np.float64), 1)
    return float(intercept), float(slope)


def fid_infinity(features: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, order: np.ndarray,
                 sizes: np.ndarray | None = None, chunk: int = 25) -> np.ndarray:
    """FID-infinity of each row of `order` ((R, n) sample indices: a permutation for the estimate, a resample for a
    replicate): FID of its first N indices for each N in `sizes` (nested subsets, as Chong & Forsyth's code takes
    them from one shuffle), then the intercept of the line fitted in 1/N."""
    order = np.atleast_2d(order)
    sizes = fid_sizes(order.shape[1], np.shape(features)[1]) if sizes is None else np.asarray(sizes)
    x = torch.from_numpy(np.asarray(features, dtype=np.float64))
    z = x @ torch.from_numpy(_sqrt_psd(np.asarray(ref_sigma, dtype=np.float64)))
    mu2 = torch.from_numpy(np.asarray(ref_mu, dtype=np.float64))
    trace2 = float(np.trace(ref_sigma))
    out = []
    for first in range(0, len(order), chunk):
        rows = torch.from_numpy(order[first:first + chunk])
        b, d = len(rows), z.shape[1]
        # running sums over the nested subsets, for a chunk of rows at once: each sample enters once
        sum_x, sum_z = torch.zeros(b, x.shape[1], dtype=x.dtype), torch.zeros(b, d, dtype=z.dtype)
        sum_sq, scatter = torch.zeros(b, dtype=x.dtype), torch.zeros(b, d, d, dtype=z.dtype)
        fids = []
        for lo, hi in zip([0, *sizes[:-1].tolist()], sizes.tolist()):
            xs, zs = x[rows[:, lo:hi]], z[rows[:, lo:hi]]
            sum_x, sum_z, sum_sq = sum_x + xs.sum(1), sum_z + zs.sum(1), sum_sq + (xs * xs).sum((1, 2))
            scatter = scatter + zs.transpose(1, 2) @ zs
            mu1, nu = sum_x / hi, sum_z / hi
            middle = (scatter - hi * nu[:, :, None] * nu[:, None, :]) / (hi - 1)
            trace1 = (sum_sq - hi * (mu1 * mu1).sum(1)) / (hi - 1)
            covmean = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum(1)
            fids.append((((mu1 - mu2) ** 2).sum(1) + trace1 + trace2 - 2 * covmean).numpy())
        out += [extrapolate(sizes, row)[0] for row in np.stack(fids, 1)]
    return np.array(out)


def wilson(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct / n (95% for z = 1.96); NaN for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
