"""Every guidance method on the embedded Fashion-MNIST model, each at its best scale from a small sweep.

    python scripts/method_table.py [--out outputs/method_table] [--num-samples 1000] [--only cfg,apg] [--dry-run]
    python scripts/method_table.py --grid flow --out outputs/method_table_flow model=fmnist_flow

Runs `python -m diffguide.run guidance=NAME scale=S out_dir=OUT/NAME/scale_S` for every point of the grid below
(default sampler DDIM, 25 steps, seed 0, so every method sees the same initial noise and labels), one point at a
time; a point whose metrics.json already exists is not run again, so an interrupted sweep resumes where it stopped.
Then prints two markdown tables: the best scale of each method (lowest FID), and every point of the sweep.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

# The sweep: scales in each method's own convention (see conf/guidance/NAME.yaml), around its paper's defaults.
GRID: dict[str, list[float | None]] = {
    "none": [None],
    "none (unconditional)": [None],
    "cfg": [1.25, 1.5, 2.0],
    "cfgpp": [0.2, 0.25, 0.3, 0.35, 0.4, 0.47, 0.6],
    "cfg_rescale": [1.5, 2.0, 3.0],
    "cfg_interval": [2.0, 3.0],
    "apg": [2.0, 3.0, 4.0],
    "adaptive": [1.5, 2.0],
    "cfg_zero_star": [1.5, 2.0],
    "autoguidance": [1.5, 2.0, 3.0],
    "classifier": [3.0, 10.0],
    "offshelf": [0.1, 0.3, 1.0],
    "offshelf (unconditional)": [1.0],
    "none (ddpm)": [None],
    "classifier (ddpm)": [3.0],
    "offshelf (ddpm)": [0.3, 1.0],
    "gfcg": [1.0, 2.0],
    "gfcg + autoguidance": [1.0],
    "universal": [0.1, 0.3],
}

# The flow model's column: the CFG family at the scales where it did best on the eps model (autoguidance and gfcg's
# autoguidance base need a weak flow model, which is not trained; the classifier methods' classifiers know the VP
# schedule, reached through sigma).
FLOW_GRID: dict[str, list[float | None]] = {
    "none": [None],
    "cfg": [1.25, 1.5, 2.0],
    "cfgpp": [0.6],
    "cfg_rescale": [2.0],
    "cfg_interval": [3.0],
    "apg": [3.0],
    "adaptive": [2.0],
    "cfg_zero_star": [2.0],
    "offshelf": [0.3],
}
GRIDS = {"eps": GRID, "flow": FLOW_GRID}

# Rows that are a method with other settings: name -> (guidance, overrides). classifier and universal guide the
# unconditional model, whose own scores are the baseline they start from; offshelf guides the conditional model, as
# EluCD does; GFCG is also shown on autoguidance, the combination its paper reports.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "none (unconditional)": ("none", ["guidance.conditional=false"]),
    "offshelf (unconditional)": ("offshelf", ["guidance.conditional_model=false"]),
    # the ancestral sampler, where classifier guidance and EluCD move the mean (condition_mean, EluCD's p_sample)
    "none (ddpm)": ("none", ["sampler=ddpm"]),
    "classifier (ddpm)": ("classifier", ["sampler=ddpm"]),
    "offshelf (ddpm)": ("offshelf", ["sampler=ddpm"]),
    "gfcg + autoguidance": ("gfcg", ["guidance.base=autoguidance", "guidance.base_scale=2.0"]),
}

COLUMNS = [("guidance", None), ("scale", None), ("fid_fmnist", "{:.2f}"), ("isc_fmnist", "{:.2f}"),
           ("precision_fmnist", "{:.3f}"), ("recall_fmnist", "{:.3f}"), ("class_accuracy", "{:.3f}"),
           ("nfe", "{:.1f}")]


def point_dir(out: Path, name: str, scale) -> Path:
    folder = name.replace(" (", "_").replace(")", "").replace(" + ", "+").replace(" ", "_")
    return out / folder / ("default" if scale is None else f"scale_{scale:g}")


def read_point(out: Path, name: str, scale) -> dict | None:
    """A finished point's metrics, under the row's own name (variants share their method's `guidance`)."""
    metrics = point_dir(out, name, scale) / "metrics.json"
    return {**json.loads(metrics.read_text()), "guidance": name} if metrics.exists() else None


def run_point(out: Path, name: str, scale, num_samples: int, extra: list[str]) -> dict | None:
    folder = point_dir(out, name, scale)
    if not (folder / "metrics.json").exists():
        guidance, variant = VARIANTS.get(name, (name, []))
        cmd = [sys.executable, "-m", "diffguide.run", f"guidance={guidance}", *variant, f"num_samples={num_samples}",
               f"out_dir={folder}", "logger=none", *([] if scale is None else [f"scale={scale}"]), *extra]
        print("+", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        with open(out / "sweep.log", "a") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                print(f"  failed: see {out / 'sweep.log'}", file=sys.stderr)
                return None
    return read_point(out, name, scale)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        cells = ["" if row.get(key) is None else fmt.format(row[key]) if fmt else str(row[key])
                 for key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/method_table"))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--only", default="", help="comma-separated methods (default: all)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="eps", help="the points to run (flow: FLOW_GRID)")
    parser.add_argument("--dry-run", action="store_true", help="only tabulate the points already run")
    parser.add_argument("extra", nargs="*", help="more overrides for every run, e.g. sampler=ddpm")
    args = parser.parse_args()
    grid = GRIDS[args.grid]
    names = [n for n in args.only.split(",") if n] or list(grid)
    unknown = [n for n in names if n not in grid]
    if unknown:
        sys.exit(f"unknown methods: {', '.join(unknown)} (known: {', '.join(grid)})")
    args.out.mkdir(parents=True, exist_ok=True)

    best, every = [], []
    for name in names:
        results = []
        for scale in grid[name]:
            result = (read_point(args.out, name, scale) if args.dry_run
                      else run_point(args.out, name, scale, args.num_samples, args.extra))
            if result is not None:
                results.append(result)
        every += results
        if results:
            best.append(min(results, key=lambda r: r["fid_fmnist"]))
    counts = sorted({r["num_samples"] for r in every})
    print(f"## Best scale per method (lowest FID; {'/'.join(map(str, counts))} samples per point)\n")
    print(table(best))
    print("\n## Every point of the sweep\n")
    print(table(every))
    rescored = sum(1 for r in every if r.get("images_generated") == 0)
    minutes = sum(r.get("wall_time_s", 0.0) for r in every) / 60
    print(f"\n{len(every)} points; their runs took {minutes:.0f} min (sum of wall_time_s)"
          + (f", {rescored} of them only re-scored samples made earlier" if rescored else ""))


if __name__ == "__main__":
    main()
