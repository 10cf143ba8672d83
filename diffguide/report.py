"""A sweep's report: every point's results with intervals, paired differences to a baseline, seeds aggregated, and
the plots the guidance papers draw, with error bars.

    python -m diffguide.report SWEEP_DIR [--out SWEEP_DIR/report] [--baseline cfg | METHOD@SCALE | ""]

Collects every metrics.json (a finished point) and failed.json (a point that stopped with an error) under
SWEEP_DIR and writes:
    report.csv            every point, every value (with each metric's 95% interval NAME_lo, NAME_hi where scored)
    report.md             the table printed on stdout: each setting with N, its intervals, and its paired
                          difference to the baseline (marked * where the 95% interval excludes 0)
    fid_vs_scale.png      FID against the guidance scale, one line per method (and sampler/steps where they vary)
    fid_vs_class_accuracy.png, precision_recall.png, fid_vs_nfe.png
                          the trade-offs with interval bars, and the Pareto front over all points (dashed)
    fid_vs_is.png         FID against IS, one curve per method over its scales
    samples_METHOD.png    the first samples of every scale, one row per scale
The baseline (--baseline, default cfg) is that method's point with the lowest FID among the points with the most
samples, or METHOD@SCALE. A difference is paired: both points' sample i started from the same seed and label, and
the bootstrap resamples the sample indices the two share (features.npz of each point; no network is run).
Points that differ only in `seed` are one setting: the table gives their mean, their standard deviation and a 95%
t-interval over the seeds. A sweep still running can be reported at any time: only finished points are used.
"""

import argparse
import csv
import hashlib
import io
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from diffguide.store import results
from diffguide.store.checkpoint import atomic_write_bytes, atomic_write_text
from diffguide.metrics import intervals

FIXED = ["guidance", "scale", "model", "sampler", "steps", "seed", "status", "reason", "nfe", "num_samples"]
#: the statistics the table shows, in order: (name in intervals.NAMES or fid_inf, number format)
SHOWN = [("fid", "{:.2f}"), ("fid_inf", "{:.2f}"), ("class_accuracy", "{:.3f}"), ("precision", "{:.3f}"),
         ("recall", "{:.3f}"), ("isc", "{:.2f}"), ("kid", "{:.4f}"), ("clip_score", "{:.2f}"),
         ("pick_score", "{:.3f}")]


def collect(sweep: Path) -> tuple[list[dict], list[results.Skipped]]:
    """One row per point under `sweep` (its report folder left out): the finished ones, then the failed ones; and the
    result files that could not be read (each with why)."""
    rows = []
    points, skipped = results.read(sweep, skip=frozenset({"report"}))
    for point in points:
        row = {k: v for k, v in point.record.items() if not isinstance(v, (dict, list))}
        row.update(status=point.status, job=str(point.folder.relative_to(sweep)), _dir=str(point.folder))
        equivalent = point.record.get("equivalent_scale")
        if isinstance(equivalent, dict) and isinstance(equivalent.get("mean"), (int, float)):
            row["equivalent_scale"] = float(equivalent["mean"])  # its per-step values stay in metrics.json
        config = point.record.get("config") or {}
        row["model"] = model_name(config)
        if row.get("seed") is None and isinstance(config.get("seed"), int):
            row["seed"] = config["seed"]
        if point.status == "done":
            guidance_cfg = (point.record.get("config") or {}).get("guidance") or {}
            if not isinstance(guidance_cfg, dict):
                guidance_cfg = {}
            row.update(reason="", _settings={k: v for k, v in guidance_cfg.items() if k not in ("scale", "_target_")})
        rows.append(row)
    return rows, skipped


def model_name(config: dict) -> str | None:
    """A point's model in a word: its weights file's stem (fmnist_unet, fmnist_guided_student_8step), a hub source's
    name, or its loader's name."""
    model = config.get("model") or {}
    if not isinstance(model, dict):
        return None
    source = model.get("weights") or model.get("source")
    if isinstance(source, str) and source:
        return Path(source.rstrip("/")).stem or source
    target = model.get("_target_")
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else None


def write_csv(rows: list[dict], path: Path) -> None:
    extra = sorted({key for row in rows for key in row if not key.startswith("_")} - set(FIXED) - {"job"})
    columns = [*FIXED, *extra, "job"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in columns})
    atomic_write_text(path, buffer.getvalue())


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    """Finished points grouped into curves: by method, by the method's settings other than its scale where the sweep
    varies them (e.g. guidance.base=autoguidance), and by model/sampler/steps where the sweep varies those (two
    students at one scale are two curves, not two seeds of one)."""
    done = [r for r in rows if r["status"] == "done"]
    vary = [key for key in ("model", "sampler", "steps") if len({r.get(key) for r in done}) > 1]
    varied_settings: dict[str, set] = {}
    for name in {r["guidance"] for r in done}:
        settings = [r.get("_settings") or {} for r in done if r["guidance"] == name]
        keys = {k for s in settings for k in s}
        # nested nodes (a classifier's config, with its file path) do not name a curve
        varied_settings[name] = {k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1
                                 and not any(isinstance(s.get(k), (dict, list)) for s in settings)}
    groups: dict[str, list[dict]] = {}
    for row in done:
        settings = row.get("_settings") or {}
        label = row.get("_label") or " ".join(
            [str(row["guidance"])] + [f"{k}={settings.get(k)}" for k in sorted(varied_settings[row["guidance"]])]
            + [f"{key}={row.get(key)}" for key in vary])
        groups.setdefault(label, []).append(row)
    for points in groups.values():
        points.sort(key=lambda r: -math.inf if r.get("scale") is None else float(r["scale"]))
    return groups


def _metric(rows: list[dict], prefix: str) -> str | None:
    names = sorted({key for row in rows for key in row if key_of(prefix, key)})
    return names[0] if names else None


def key_of(name: str, key: str) -> bool:
    return intervals.is_column(name, key)


def column(row: dict, name: str) -> str | None:
    return next((key for key in row if key_of(name, key) and isinstance(row[key], (int, float))), None)


# --- settings: the points of one method/scale, over seeds ---

def settings(rows: list[dict]) -> dict[tuple[str, object], list[dict]]:
    """(curve label, scale) -> its finished points, one per seed."""
    out: dict[tuple[str, object], list[dict]] = {}
    for label, points in _series(rows).items():
        for row in points:
            out.setdefault((label, row.get("scale")), []).append(row)
    return out


def overlapping_seeds(points: list[dict]) -> list[str]:
    """Pairs of a setting's points whose samples overlap (sample i is seeded with seed + i): not independent."""
    spans = sorted((p.get("seed") or 0, (p.get("seed") or 0) + int(p.get("num_samples") or 0)) for p in points)
    return [f"seeds {a} and {c}" for (a, b), (c, _) in zip(spans, spans[1:]) if c < b]


def aggregate(points: list[dict], name: str) -> tuple[float, float, float, float] | None:
    """(value, low, high, spread) of statistic `name` over a setting's points: one point: its value and bootstrap
    interval (spread 0); several seeds: their mean, a 95% t-interval over seeds and their standard deviation."""
    key = column(points[0], name)
    if key is None:
        return None
    values = [float(p[key]) for p in points if p.get(key) is not None]
    if len(values) == 1:
        low, high = points[0].get(f"{key}_lo"), points[0].get(f"{key}_hi")
        return values[0], (math.nan if low is None else low), (math.nan if high is None else high), 0.0
    mean, low, high = intervals.t_interval(values)
    return mean, low, high, float(np.std(values, ddof=1))


def _stats(point: dict) -> intervals.PointStats | None:
    """The point's per-sample statistics; None where it has none, or where its features.npz cannot be read (then
    `point["_unreadable"]` says why, and the point is reported without paired differences)."""
    path = Path(point["_dir"]) / "features.npz"
    if not path.is_file() or point.get("_unreadable"):
        return None
    try:
        return intervals.PointStats.load(path)
    except (OSError, ValueError) as exc:
        point["_unreadable"] = results.Skipped(path, str(exc).splitlines()[0])
        return None


def safe_name(label: str) -> str:
    """A file-name part from text a run folder gave (a method's name, its settings): letters, digits and ._+=-
    only, no leading dot, at most 80 characters (then a digest of the whole, so two long labels stay apart).
    Nothing read from a results file becomes a path."""
    name = re.sub(r"[^A-Za-z0-9._+=-]+", "_", label).lstrip("._-") or "method"
    return f"{name[:80]}-{hashlib.sha256(label.encode()).hexdigest()[:8]}" if len(name) > 80 else name


def differences(points: list[dict], baseline: list[dict], replicate_count: int = 1000) -> dict[str, tuple]:
    """name -> (difference, low, high) of the setting's statistics minus the baseline's, paired over the sample
    indices (each seed against the baseline's point of the same seed; several seeds: the mean difference, its
    replicates the mean of each seed's). Statistics without per-sample terms on both sides are left out.

    A baseline with more samples than the point (the same seed: its first N samples are the point's partners) is
    cut to the point's N; then only the statistics that per-sample terms give exactly at any N are compared (FID,
    precision, class accuracy; recall's balls, IS's splits and KID's subsets depend on the whole set), both sides
    computed from their terms."""
    with intervals.one_thread():
        return _differences(points, baseline, replicate_count)


#: the baseline's replicates, computed once for every setting compared with it: (folder, N, statistic) -> replicates
_BASELINE_REPLICATES: dict[tuple, np.ndarray] = {}


def _differences(points: list[dict], baseline: list[dict], replicate_count: int) -> dict[str, tuple]:
    per_name: dict[str, list[tuple[float, np.ndarray]]] = {}
    wins: dict[str, list[float]] = {}
    for point in points:
        partner = next((b for b in baseline if b.get("seed") == point.get("seed")
                        and (b.get("num_samples") or 0) >= (point.get("num_samples") or 0)), None)
        if partner is None:
            return {}
        a, b = _stats(point), _stats(partner)
        if a is None or b is None:
            return {}
        cut = len(b) > len(a)
        if cut:
            b = _first(b, len(a))
        if len(a) != len(b) or not np.array_equal(a.labels, b.labels):
            return {}
        weights = intervals.counts(intervals.resample(len(a), replicate_count), len(a))
        names = set(a.available()) & set(b.available()) & ({"fid", "precision", "class_accuracy"} if cut else
                                                            set(intervals.NAMES))
        for name in names:
            key = column(point, name)
            if key is None or column(partner, name) != key:
                continue
            if point["_dir"] == partner["_dir"]:
                reps = np.zeros(replicate_count)
            else:
                memo = (partner["_dir"], len(a), name, replicate_count)
                if memo not in _BASELINE_REPLICATES:
                    _BASELINE_REPLICATES[memo] = intervals.replicates(b, name, weights)
                reps = intervals.replicates(a, name, weights) - _BASELINE_REPLICATES[memo]
            if cut:
                ones = np.ones((1, len(a)))
                estimate = float(intervals.replicates(a, name, ones)[0] - intervals.replicates(b, name, ones)[0])
            else:
                estimate = float(point[key]) - float(partner[key])
            per_name.setdefault(name, []).append((estimate, reps))
        for name in set(WIN_RATES) & set(a.available()) & set(b.available()):
            wins.setdefault(name, []).append(win_rate(getattr(a, name), getattr(b, name)))
    out = {}
    for name, items in per_name.items():
        if len(items) == len(points):
            estimate = float(np.mean([e for e, _ in items]))
            low, high = intervals.interval(estimate, np.mean([r for _, r in items], 0))
            out[name] = (estimate, low, high)
    for name, rates in wins.items():
        if len(rates) == len(points):
            out[f"win_{name}"] = (float(np.mean(rates)), math.nan, math.nan)
    return out


#: the per-sample scores (higher is better) whose paired win rate against the baseline the report shows
WIN_RATES = ("clip_score", "pick_score")


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """The share of paired samples (same prompt, same seed) where a scores higher than b, ties counted half: the
    per-prompt win rate text-to-image comparisons report (Guidance Matters' protocol)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((a > b).mean() + 0.5 * (a == b).mean())


def _first(stats: intervals.PointStats, n: int) -> intervals.PointStats:
    """A point's per-sample terms of its first n samples (those that precision and FID need, and the labels)."""
    cut = intervals.PointStats(labels=stats.labels[:n])
    for name in ("features", "in_reference", "correct"):
        if getattr(stats, name) is not None:
            setattr(cut, name, getattr(stats, name)[:n])
    cut.ref_mu, cut.ref_sigma = stats.ref_mu, stats.ref_sigma
    return cut


def significant(low: float, high: float) -> bool:
    return low > 0 or high < 0


def choose_baseline(table: dict, spec: str | None) -> tuple | None:
    """The setting named by `spec` (METHOD or METHOD@SCALE; a curve label or a guidance name): with no scale, its
    lowest-FID setting among those with the most samples."""
    if not spec:
        return None
    name, _, scale = spec.partition("@")
    found = [key for key, points in table.items()
             if (key[0] == name or points[0].get("guidance") == name)
             and (not scale or (key[1] is not None and math.isclose(float(key[1]), float(scale))))]
    if not found:
        return None
    most = max(table[key][0].get("num_samples") or 0 for key in found)
    found = [key for key in found if (table[key][0].get("num_samples") or 0) == most]
    return min(found, key=lambda key: (aggregate(table[key], "fid") or (math.inf,))[0])


def cell(value, fmt, low=math.nan, high=math.nan) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = fmt.format(value)
    if not (math.isnan(low) or math.isnan(high)):
        text += f" [{fmt.format(low)}, {fmt.format(high)}]"
    return text


#: the statistics with a paired-difference column against the baseline
PAIRED = ("fid", "class_accuracy", "clip_score", "pick_score")


def equivalent_scale(point: dict) -> float | None:
    """The mean equivalent CFG scale a run logged (run ... equivalent_scale=true), or None."""
    found = point.get("equivalent_scale")
    return float(found) if isinstance(found, (int, float)) and not isinstance(found, bool) else None


def compute_matched(table: dict) -> list[str]:
    """Guidance Matters' compute-matched baseline for every non-CFG setting that logged its equivalent scale: CFG at
    that scale with the steps that spend the method's network evaluations (CFG spends 2 a step)."""
    lines = []
    for key, points in table.items():
        first = points[0]
        scale, nfe, steps = equivalent_scale(first), first.get("nfe"), first.get("steps")
        if key[0] == "cfg" or scale is None or not isinstance(nfe, (int, float)) or not isinstance(steps, int):
            continue
        lines.append(f"{key[0]} {'' if key[1] is None else f'{key[1]:g}'}: compute-matched CFG: guidance=cfg "
                     f"scale={scale:.2f} steps={max(1, round(nfe / 2))} ({nfe:g} evaluations, {steps} steps)")
    return lines


def markdown(table: dict, baseline: tuple | None, diffs: dict) -> str:
    """Each setting: N, seeds, NFE, sampling seconds per 1000 samples (on the machine that made them), every
    statistic with its interval, and its paired difference to the baseline for FID and class accuracy (* where the
    interval excludes 0)."""
    shown = [(name, fmt) for name, fmt in SHOWN if any(column(p[0], name) for p in table.values())]
    equivalent = any(equivalent_scale(p[0]) is not None for p in table.values())
    headers = ["method", "scale", "N", "seeds", "nfe", "s / 1000 samples"] + (["eq. CFG scale"] if equivalent else [])
    against = "" if baseline is None else f" vs {baseline[0]}" + ("" if baseline[1] is None else f" {baseline[1]:g}")
    for name, _ in shown:
        key = next(column(p[0], name) for p in table.values() if column(p[0], name))
        headers.append(key)
        if name in PAIRED and baseline is not None:
            headers.append(f"Δ{name}{against}")
        if name in WIN_RATES and baseline is not None:
            headers.append(f"{name} wins{against}")
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for key, points in table.items():
        first = points[0]
        seeds = sorted(p.get("seed") for p in points if p.get("seed") is not None)
        cells = [key[0], "" if key[1] is None else f"{key[1]:g}", str(first.get("num_samples", "")),
                 ",".join(map(str, seeds)), cell(first.get("nfe"), "{:.1f}"),
                 cell(float(np.mean([seconds_per_image(p) for p in points])) * 1000, "{:.0f}")]
        if equivalent:
            cells.append(cell(equivalent_scale(first), "{:.2f}"))
        for name, fmt in shown:
            value = aggregate(points, name)
            cells.append("" if value is None else cell(value[0], fmt, value[1], value[2])
                         + (f" ±{fmt.format(value[3])}" if len(points) > 1 else ""))
            if name in PAIRED and baseline is not None:
                d = diffs.get(key, {}).get(name)
                cells.append("baseline" if key == baseline else "" if d is None else
                             cell(d[0], "{:+" + fmt[2:], d[1], d[2]) + (" *" if significant(d[1], d[2]) else ""))
            if name in WIN_RATES and baseline is not None:
                w = diffs.get(key, {}).get(f"win_{name}")
                cells.append("baseline" if key == baseline else "" if w is None else f"{w[0]:.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seconds_per_image(point: dict) -> float:
    """Sampling seconds per image over every run that made the point's images (older points: their last run's)."""
    if point.get("sampling_s_per_image") is not None:
        return float(point["sampling_s_per_image"])
    images = point.get("images_generated") or 0
    return float(point.get("sampling_wall_s") or 0.0) / images if images else math.nan


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def pareto(points: list[tuple[float, float]], x_better: int, y_better: int) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (`*_better`: +1 higher is better, -1 lower), sorted by x."""
    def beats(a, b):
        return (x_better * (a[0] - b[0]) >= 0 and y_better * (a[1] - b[1]) >= 0) and a != b

    return sorted(p for p in points if not any(beats(q, p) for q in points))


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = settings(rows)
    labels = sorted({key[0] for key in table})
    fid_name = "fid"
    written = []
    # (file, x statistic, y statistic, x better, y better: +1 higher, -1 lower, 0 no front)
    specs = [("fid_vs_scale.png", "scale", fid_name, 0, 0),
             ("fid_vs_is.png", "isc", fid_name, 0, 0),
             ("fid_vs_class_accuracy.png", "class_accuracy", fid_name, 1, -1),
             ("precision_recall.png", "recall", "precision", 1, 1),
             ("fid_vs_nfe.png", "nfe", fid_name, -1, -1)]
    for name, x_stat, y_stat, x_better, y_better in specs:
        fig, ax = plt.subplots(figsize=(7.5, 5))
        colours = plt.get_cmap("tab20").colors
        markers = "osD^v<>pPXh*"
        drawn, everything, axis_names = 0, [], [None, None]
        for index, label in enumerate(labels):
            pts = []
            for (curve, scale), points in sorted(table.items(), key=lambda kv: -math.inf if kv[0][1] is None
                                                 else float(kv[0][1])):
                if curve != label:
                    continue
                xs = _axis(points, x_stat, scale)
                ys = _axis(points, y_stat, scale)
                if xs is None or ys is None:
                    continue
                axis_names = [xs[4], ys[4]]
                pts.append((xs, ys))
            if not pts:
                continue
            colour = colours[index % len(colours)]
            x = [p[0][0] for p in pts]
            y = [p[1][0] for p in pts]
            ax.plot(x, y, marker=markers[index % len(markers)], color=colour, label=label)
            xerr = _bars(pts, 0)
            yerr = _bars(pts, 1)
            if xerr is not None or yerr is not None:
                ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor=colour, alpha=0.5, capsize=2)
            everything += list(zip(x, y))
            drawn += 1
        if drawn:
            if x_better and y_better and len(everything) > 1:
                front = pareto(everything, x_better, y_better)
                ax.plot(*zip(*front), ls="--", color="black", lw=1, label="Pareto front (all points)")
            ax.set_xlabel(axis_names[0] if x_stat != "nfe" else "nfe (network evaluations per sample)")
            ax.set_ylabel(axis_names[1])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            _save(fig, out / name)
            written.append(out / name)
        plt.close(fig)
    written += sample_grids(_series(rows), out)
    return written


def _axis(points: list[dict], stat: str, scale) -> tuple | None:
    """(value, low, high, spread, column name) of a setting on one axis: a statistic, or the scale, or NFE."""
    if stat == "scale":
        return None if scale is None else (float(scale), math.nan, math.nan, 0.0, "guidance scale (each method's own "
                                           "convention)")
    if stat == "nfe":
        value = points[0].get("nfe")
        return None if value is None else (float(value), math.nan, math.nan, 0.0, "nfe")
    value = aggregate(points, stat)
    return None if value is None else (*value, column(points[0], stat))


def _bars(pts, axis: int):
    """matplotlib's asymmetric error bars from each point's interval (None where no point has one)."""
    lows = [p[axis][0] - p[axis][1] for p in pts]
    highs = [p[axis][2] - p[axis][0] for p in pts]
    if all(math.isnan(v) for v in lows + highs):
        return None
    return [[0.0 if math.isnan(v) else v for v in lows], [0.0 if math.isnan(v) else v for v in highs]]


def sample_grids(groups: dict[str, list[dict]], out: Path, per_row: int = 10) -> list[Path]:
    """samples_METHOD.png: the first `per_row` samples of each curve's points, one row per scale."""
    from PIL import Image

    written = []
    for label, points in groups.items():
        strips = []
        for point in points:
            folder = Path(point["_dir"])
            images = []
            for f in sorted((folder / "samples").glob("*.png"))[:per_row]:
                try:
                    with Image.open(f) as image:
                        images.append(image.convert("RGB"))
                except (OSError, ValueError) as exc:  # PIL's errors for a damaged file are OSErrors
                    point.setdefault("_damaged_samples", []).append(results.Skipped(f, f"not a whole PNG "
                                                                                      f"({type(exc).__name__})"))
            if images:
                strips.append(images)
        if not strips:
            continue
        w, h = strips[0][0].size
        grid = Image.new("RGB", (w * per_row, h * len(strips)), "white")
        for r, strip in enumerate(strips):
            for c, image in enumerate(strip):
                grid.paste(image.resize((w, h)), (c * w, r * h))
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        path = out / f"samples_{safe_name(label.replace(' ', '_').replace('=', '-'))}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def report(rows: list[dict], baseline_spec: str | None = "cfg") -> tuple[str, list[str]]:
    """The markdown table of `rows` (finished points; `_dir` each point's folder), its notes, and each row's paired
    difference columns added in place (delta_NAME, delta_NAME_lo, delta_NAME_hi, for the CSV)."""
    table = settings(rows)
    notes = []
    baseline = choose_baseline(table, baseline_spec)
    if baseline_spec and baseline is None:
        notes.append(f"no finished point of baseline {baseline_spec!r}: no differences")
    diffs = {}
    for key, points in table.items():
        overlap = overlapping_seeds(points)
        if overlap:
            notes.append(f"{key[0]} {key[1]}: {', '.join(overlap)} share samples (sample i starts from seed + i): "
                         f"space seeds num_samples apart for independent seeds")
        if baseline is not None:
            diffs[key] = differences(points, table[baseline])
            for point in points:
                for name, (estimate, low, high) in diffs[key].items():
                    if name.startswith("win_"):
                        point[name] = estimate
                        continue
                    col = column(point, name)
                    point[f"delta_{col}"], point[f"delta_{col}_lo"], point[f"delta_{col}_hi"] = estimate, low, high
    if baseline is not None:
        unpaired = [f"{k[0]} {k[1]}" for k in table if k not in diffs or not diffs[k]]
        if unpaired:
            notes.append(f"{len(unpaired)} setting(s) not paired with the baseline (other seeds or sample count, or "
                         f"no features.npz): {'; '.join(unpaired[:5])}{'; ...' if len(unpaired) > 5 else ''}")
    notes.extend(compute_matched(table))
    return markdown(table, baseline, diffs), notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffguide.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep (or run) folder")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: SWEEP/report)")
    parser.add_argument("--baseline", default="cfg",
                        help="METHOD (its lowest-FID point) or METHOD@SCALE; '' for no differences (default: cfg)")
    def refuse(message):  # argparse would print its usage block too: one line, as the run command answers
        print(f"diffguide: error: {message} (usage: python -m diffguide.report SWEEP_DIR [--out DIR] [--baseline METHOD[@SCALE]])",
              file=sys.stderr)
        sys.exit(2)

    parser.error = refuse
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        print(f"diffguide: error: {args.sweep} is not a folder", file=sys.stderr)
        return 2
    rows, skipped = collect(args.sweep)
    for item in skipped:
        print(f"diffguide: warning: skipped {item.path}: {item.why}", file=sys.stderr)
    if not rows:
        print(f"diffguide: error: no readable {results.METRICS} or {results.FAILED} under {args.sweep}", file=sys.stderr)
        return 2
    out = args.out or args.sweep / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"diffguide: error: --out {out} cannot be made ({exc.strerror or type(exc).__name__})", file=sys.stderr)
        return 2
    done = [r for r in rows if r["status"] == "done"]
    text, notes = report(done, args.baseline) if done else ("", [])
    write_csv(rows, out / "report.csv")
    written = plot(rows, out)
    failed = [r for r in rows if r["status"] == "failed"]
    if text:
        counts = sorted({int(r.get("num_samples") or 0) for r in done})
        legend = (f"95% intervals in brackets (bootstrap over samples; over seeds where a setting has several, "
                  f"± their standard deviation); N = {'/'.join(map(str, counts))} samples per point; "
                  f"* a paired difference whose interval excludes 0")
        atomic_write_text(out / "report.md", f"{text}\n\n{legend}\n" + "".join(f"\n- {n}" for n in notes))
        print(text)
        print(f"\n{legend}")
    for note in notes:
        print(f"note: {note}")
    print(f"{len(rows) - len(failed)} finished, {len(failed)} failed points -> {out / 'report.csv'}")
    for row in failed:
        print(f"  failed: {row['job']}: {row.get('reason', '')}")
    for path in written:
        print(f"  wrote {path}")
    unreadable = [r["_unreadable"] for r in done if r.get("_unreadable")]
    unreadable += [item for r in done for item in r.get("_damaged_samples", [])]
    for item in unreadable:
        print(f"diffguide: warning: {item.path} left out: {item.why}", file=sys.stderr)
    return 1 if skipped or unreadable else 0  # the report is of the rest: the status says it is not of everything


if __name__ == "__main__":
    sys.exit(main())
