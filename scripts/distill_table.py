"""The guidance-distilled students against the teacher's CFG, at w in {1.5, 2, 3}, and FID against NFE.

    python scripts/distill_table.py [--out outputs/distill] [--num-samples 1000] [--scales 1.5,2,3] [--dry-run]
                                    [--plot docs/distill_fid_vs_nfe.png] [--no-fast-paths]

Every point is `python -m diffguide.run model=... steps=... scale=W out_dir=OUT/ROW/scale_W` (seed 0: every row sees
the same initial noise and labels, so the rows are paired), run one at a time; a finished point is read, not run
again (one scored before intervals existed is scored again from its samples). The baseline of each w is the
teacher's CFG at 25 DDIM steps (50 NFE); every row gets its paired difference to it (95% bootstrap interval; `*`
where the interval excludes 0) and its FID as a ratio of the baseline's. The fast paths the project already has
(cfg_interval, adaptive) are run at the same w for the plot.
"""

import argparse
import json
import math
from pathlib import Path

from method_table import ensure_point  # scripts/ is on sys.path when this file runs

from diffguide import report

# row -> (overrides, steps); the scale is added per point. Guidance defaults: cfg, or a student's own (distilled).
ROWS: dict[str, tuple[list[str], int]] = {
    "CFG, 25 steps": (["guidance=cfg"], 25),
    "CFG, 8 steps": (["guidance=cfg"], 8),
    "CFG, 4 steps": (["guidance=cfg"], 4),
    "student (stage 1), 25 steps": (["model=fmnist_guided_student"], 25),
    "student (stage 1), 16 steps": (["model=fmnist_guided_student"], 16),  # the first progressive teacher
    "LoRA student (stage 1), 25 steps": (["model=fmnist_guided_student_lora"], 25),
    "progressive student, 8 steps": (["model=fmnist_guided_student_8step"], 8),
    "progressive student, 4 steps": (["model=fmnist_guided_student_4step"], 4),
}
FAST_PATHS: dict[str, tuple[list[str], int]] = {
    "cfg_interval, 25 steps": (["guidance=cfg_interval"], 25),
    "adaptive, 25 steps": (["guidance=adaptive"], 25),
}
BASELINE = "CFG, 25 steps"


def folder(out: Path, row: str, scale: float) -> Path:
    name = row.replace(" (", "_").replace(")", "").replace(", ", "_").replace(" ", "_")
    return out / name / f"scale_{scale:g}"


def point(out: Path, row: str, scale: float, overrides: list[str], steps: int, n: int, dry_run: bool) -> dict | None:
    path = folder(out, row, scale)
    if dry_run:
        metrics = path / "metrics.json"
        done = json.loads(metrics.read_text()) if metrics.exists() else None
    else:
        done = ensure_point(path, [*overrides, f"steps={steps}", f"scale={scale}"], n, out / "runs.log", rescore=True)
    if done is None or done["num_samples"] != n:
        return None
    return {**done, "_label": row, "_dir": str(path), "seed": done["config"]["seed"], "status": "done"}


def _fmt(value, low=math.nan, high=math.nan, digits=2) -> str:
    return report.cell(value, f"{{:.{digits}f}}", low, high) or "-"


def table(points: dict[tuple[str, float], dict], scales: list[float]) -> str:
    lines = ["| row | w | NFE | FID | Δ FID vs CFG 25 steps | FID / CFG's | precision | recall | class accuracy | "
             "Δ accuracy | s / 1000 samples |", "| --- | " + "--- | " * 10]
    for scale in scales:
        base = points.get((BASELINE, scale))
        for (row, w), p in points.items():
            if w != scale:
                continue
            diffs = report.differences([p], [base]) if base is not None and p is not base else {}
            cells = [row, f"{w:g}", f"{p['nfe']:g}", _fmt(p["fid_fmnist"], p.get("fid_fmnist_lo", math.nan),
                                                            p.get("fid_fmnist_hi", math.nan))]
            for name in ("fid",):
                d = diffs.get(name)
                cells.append("-" if d is None else _fmt(*d) + ("*" if report.significant(d[1], d[2]) else ""))
            cells.append("-" if base is None else f"{p['fid_fmnist'] / base['fid_fmnist']:.2f}")
            cells += [_fmt(p.get("precision_fmnist"), p.get("precision_fmnist_lo", math.nan),
                           p.get("precision_fmnist_hi", math.nan), digits=3),
                      _fmt(p.get("recall_fmnist"), p.get("recall_fmnist_lo", math.nan),
                           p.get("recall_fmnist_hi", math.nan), digits=3),
                      _fmt(p.get("class_accuracy"), p.get("class_accuracy_lo", math.nan),
                           p.get("class_accuracy_hi", math.nan), digits=3)]
            d = diffs.get("class_accuracy")
            cells.append("-" if d is None else _fmt(*d, digits=3) + ("*" if report.significant(d[1], d[2]) else ""))
            cells.append(_fmt(1000 * report.seconds_per_image(p), digits=0))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: dict[tuple[str, float], dict], scales: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scales), figsize=(5 * len(scales), 4.2), sharey=True, squeeze=False)
    styles = {"CFG": ("C0", "o-"), "student (stage 1)": ("C3", "s-"), "LoRA student (stage 1)": ("C4", "D"),
              "progressive student": ("C1", "^-"), "cfg_interval": ("C2", "v"), "adaptive": ("C5", "P")}
    for ax, scale in zip(axes[0], scales):
        for family, (colour, marker) in styles.items():
            pts = sorted(((p["nfe"], p) for (row, w), p in points.items()
                          if w == scale and row.rsplit(", ", 1)[0] == family), key=lambda item: item[0])
            if not pts:
                continue
            xs = [nfe for nfe, _ in pts]
            ys = [p["fid_fmnist"] for _, p in pts]
            err = [[max(p["fid_fmnist"] - p.get("fid_fmnist_lo", p["fid_fmnist"]), 0) for _, p in pts],
                   [max(p.get("fid_fmnist_hi", p["fid_fmnist"]) - p["fid_fmnist"], 0) for _, p in pts]]
            ax.errorbar(xs, ys, yerr=err, fmt=marker, color=colour, label=family, capsize=3)
        base = points.get((BASELINE, scale))
        if base is not None:
            ax.axhline(1.3 * base["fid_fmnist"], color="grey", ls=":", lw=1, label="1.3 x CFG at 50 NFE")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("network evaluations per sample (NFE)")
        ax.set_title(f"w = {scale:g}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("FID (fmnist evaluator), 95% bootstrap interval")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/distill"))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--scales", default="1.5,2,3")
    parser.add_argument("--only", default="", help="rows separated by ';' (default: all; the baseline always)")
    parser.add_argument("--no-fast-paths", action="store_true", help="leave out cfg_interval and adaptive")
    parser.add_argument("--plot", type=Path, default=Path("docs/distill_fid_vs_nfe.png"))
    parser.add_argument("--dry-run", action="store_true", help="only tabulate the points already run")
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    rows = {**ROWS, **({} if args.no_fast_paths else FAST_PATHS)}
    if args.only:
        rows = {k: v for k, v in rows.items() if k in args.only.split(";") or k == BASELINE}
    points = {}
    for scale in scales:
        for row, (overrides, steps) in rows.items():
            p = point(args.out, row, scale, overrides, steps, args.num_samples, args.dry_run)
            if p is not None:
                points[(row, scale)] = p
    print(f"## Distilled students against the teacher's CFG ({args.num_samples} samples per point, seed 0)\n")
    print(table(points, scales))
    print("\n95% bootstrap intervals in brackets; Δ: paired difference to CFG at 25 steps (50 NFE) at the same w, "
          "* where its interval excludes 0")
    plot(points, scales, args.plot)
    print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
