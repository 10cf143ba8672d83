"""A sweep's report: every job's results in one CSV, and the plots the guidance papers draw.

    python -m diffguide.report SWEEP_DIR [--out SWEEP_DIR/report] [--metric fid_fmnist]

Collects every metrics.json (a finished point) and failed.json (a point that stopped with an error) under
SWEEP_DIR, writes report.csv, and draws with matplotlib:
    fid_vs_scale.png      FID against the guidance scale, one line per method (and sampler/steps where they vary)
    fid_vs_is.png         the FID / Inception-score trade-off, one curve per method over its scales
    precision_recall.png  precision against recall, one curve per method
    fid_vs_nfe.png        FID against network evaluations per sample
    samples_METHOD.png    the first samples of every scale, one row per scale
A sweep still running can be reported at any time: only finished points are drawn.
"""

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

from diffguide import results
from diffguide.checkpoint import atomic_write_bytes, atomic_write_text

FIXED = ["guidance", "scale", "sampler", "steps", "status", "reason", "nfe", "num_samples"]


def collect(sweep: Path) -> list[dict]:
    """One row per point under `sweep` (its report folder left out): the finished ones, then the failed ones."""
    rows = []
    for point in results.read(sweep, skip=frozenset({"report"})):
        row = {k: v for k, v in point.record.items() if not isinstance(v, (dict, list))}
        row.update(status=point.status, job=str(point.folder.relative_to(sweep)))
        if point.status == "done":
            guidance_cfg = (point.record.get("config") or {}).get("guidance") or {}
            row.update(reason="", _settings={k: v for k, v in guidance_cfg.items() if k not in ("scale", "_target_")})
        rows.append(row)
    return rows


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
    varies them (e.g. guidance.base=autoguidance), and by sampler/steps where the sweep varies those."""
    done = [r for r in rows if r["status"] == "done"]
    vary = [key for key in ("sampler", "steps") if len({r.get(key) for r in done}) > 1]
    varied_settings: dict[str, set] = {}
    for name in {r["guidance"] for r in done}:
        settings = [r.get("_settings") or {} for r in done if r["guidance"] == name]
        keys = {k for s in settings for k in s}
        varied_settings[name] = {k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1}
    groups: dict[str, list[dict]] = {}
    for row in done:
        settings = row.get("_settings") or {}
        label = " ".join([str(row["guidance"])]
                         + [f"{k}={settings.get(k)}" for k in sorted(varied_settings[row["guidance"]])]
                         + [f"{key}={row.get(key)}" for key in vary])
        groups.setdefault(label, []).append(row)
    for points in groups.values():
        points.sort(key=lambda r: -math.inf if r.get("scale") is None else float(r["scale"]))
    return groups


def _metric(rows: list[dict], prefix: str) -> str | None:
    names = sorted({key for row in rows for key in row if key.startswith(prefix) and "_std" not in key})
    return names[0] if names else None


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot(rows: list[dict], out: Path, fid_key: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _series(rows)
    fid = fid_key or _metric(rows, "fid")
    written = []
    specs = [("fid_vs_scale.png", "scale", fid, "guidance scale (each method's own convention)", "FID"),
             ("fid_vs_is.png", _metric(rows, "isc"), fid, "Inception score", "FID"),
             ("precision_recall.png", _metric(rows, "recall"), _metric(rows, "precision"), "recall", "precision"),
             ("fid_vs_nfe.png", "nfe", fid, "network evaluations per sample", "FID")]
    for name, x_key, y_key, x_label, y_label in specs:
        if x_key is None or y_key is None:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 5))
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors[:len(groups) or 1])
        markers = "osD^v<>pPXh*"
        drawn = 0
        for index, (label, points) in enumerate(sorted(groups.items())):
            pts = [(float(p[x_key]), float(p[y_key])) for p in points
                   if p.get(x_key) is not None and p.get(y_key) is not None]
            if not pts:
                continue
            ax.plot(*zip(*pts), marker=markers[index % len(markers)], label=label)
            drawn += 1
        if drawn:
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label.replace("FID", fid or "FID"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            _save(fig, out / name)
            written.append(out / name)
        plt.close(fig)
    written += sample_grids(groups, out)
    return written


def sample_grids(groups: dict[str, list[dict]], out: Path, per_row: int = 10) -> list[Path]:
    """samples_METHOD.png: the first `per_row` samples of each curve's points, one row per scale."""
    from PIL import Image

    written = []
    for label, points in groups.items():
        strips = []
        for point in points:
            folder = Path(point["_dir"])
            files = sorted((folder / "samples").glob("*.png"))[:per_row]
            if files:
                strips.append([Image.open(f).convert("RGB") for f in files])
        if not strips:
            continue
        w, h = strips[0][0].size
        grid = Image.new("RGB", (w * per_row, h * len(strips)), "white")
        for r, strip in enumerate(strips):
            for c, image in enumerate(strip):
                grid.paste(image.resize((w, h)), (c * w, r * h))
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        path = out / f"samples_{label.replace(' ', '_').replace('=', '-')}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffguide.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep (or run) folder")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: SWEEP/report)")
    parser.add_argument("--metric", default=None, help="the FID column to plot (default: the first fid_* found)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        print(f"error: {args.sweep} is not a folder", file=sys.stderr)
        return 2
    rows = collect(args.sweep)
    if not rows:
        print(f"error: no {results.METRICS} or {results.FAILED} under {args.sweep}", file=sys.stderr)
        return 2
    for row in rows:
        row["_dir"] = str(args.sweep / row["job"])
    out = args.out or args.sweep / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "report.csv")
    written = plot(rows, out, args.metric)
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"{len(rows) - len(failed)} finished, {len(failed)} failed points -> {out / 'report.csv'}")
    for row in failed:
        print(f"  failed: {row['job']}: {row.get('reason', '')}")
    for path in written:
        print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
