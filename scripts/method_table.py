"""Every guidance method on the embedded Fashion-MNIST model, each at a scale tuned by one rule, with intervals.

    python scripts/method_table.py [--out outputs/method_table] [--tune-samples 1000] [--num-samples 2000]
                                   [--only cfg,apg] [--dry-run]
    python scripts/method_table.py --grid flow --out outputs/method_table_flow model=fmnist_flow

Every point is `python -m diffguide.run guidance=NAME scale=S out_dir=OUT/NAME/scale_S` (default sampler DDIM, 25
steps, seed 0, so every method sees the same initial noise and labels: the samples are paired), run one at a time; a
point already run is not run again, so an interrupted table resumes where it stopped.

The rule, the same for every method: the scale with the lowest FID at --tune-samples samples, found by a bracketing
search from the method's starting grid below (while the best scale is at an end of the scales tried, one more scale
beyond it, at most --extend times; then one bisection between the best scale and its better neighbour). The search's
FIDs are kept in OUT/tune.json. The chosen scale is then run at --num-samples (the same folder: its first
--tune-samples samples are reused) and the table is `python -m diffguide.report`'s, with 95% bootstrap intervals and
paired differences to CFG at its chosen scale.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from diffguide import report
from diffguide.store.atomic import atomic_write_text

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
# The field's methods (README "The field's methods"), on the embedded UNet (`--grid field`, 500 samples per point)
# and on the embedded transformer (`--grid field_dit ... model=fmnist_dit`): CFG at three scales (the baseline row is
# the best of them), then each newer method at two scales around its paper's or diffusers' default (the CFG-like
# ones at and above CFG's best w), the best of the two in the table; every point at seed 0 (paired samples). No
# search: the CPU's budget. The transformer costs about four times the UNet per sample, so its column takes one
# scale per method, at or near the UNet's better one (chosen before the UNet's column had finished).
FIELD_GRID: dict[str, list[float | None]] = {
    "none": [None],
    "cfg": [1.25, 1.5, 2.0],
    "cfg (linear)": [1.5, 2.0],
    "cfg (cosine)": [1.5, 2.0],
    "cfg (dynamic threshold)": [2.0, 3.0],
    "apg_mix": [2.0, 3.0],
    "tcfg": [1.5, 2.0],
    "fdg": [2.0, 3.0],
    "mag": [1.5, 2.0],
    "icg": [1.5, 2.0],
    "tsg": [1.5, 2.0],
    "pag": [1.0, 3.0],
    "pag + cfg": [0.5, 1.0],
    "seg": [1.0, 3.0],
    "slg + cfg": [1.0, 2.8],
}
FIELD_DIT_GRID: dict[str, list[float | None]] = {  # the network-perturbation methods first: the column's reason
    "none": [None],
    "cfg": [1.25, 1.5, 2.0],
    # On this 6-block DiT a perturbed middle block moves eps 5-7x as far as the conditional-unconditional difference
    # does (at t = 200: identity attention 0.29, uniform attention 0.41, a skipped block 0.39 of norm(eps_c), against
    # 0.058 for eps_c - eps_u), so the papers' s = 1-3 overshoots: s = 0.1 matches CFG's step at w = 1.25-1.5.
    "pag": [0.1, 1.0],
    "seg": [0.1],
    "slg + cfg": [0.1],
    "pag + cfg": [0.1, 0.5],
    "tsg": [1.5],
    "icg": [1.5],
    # not run in this column yet (the CPU's budget): tcfg [2.0], mag [1.5], fdg [2.0], apg_mix [2.0], cfg (linear)
    # and (cosine) [1.5], cfg (dynamic threshold) [2.0]
}
# The classifiers (README "The model as classifier and as editor"; `--grid classifiers`, 500 samples per point, each
# row tuned by the rule): classifier guidance of the unconditional model with the noise-aware classifier trained with
# labels, with the PPAP experts (the off-the-shelf classifier fine-tuned per noise range on the model's own samples,
# no labels), EluCD's off-the-shelf guidance on the same unconditional model and on the conditional one (its own
# setting), and the Diffusion Classifier (the generator judging its own x0 estimate) through the same off-the-shelf
# rule; CFG for the paired baseline.
CLASSIFIER_GRID: dict[str, list[float | None]] = {
    "none (unconditional)": [None],
    "cfg": [1.25, 1.5, 2.0],
    "classifier": [3.0, 10.0],
    "classifier (ppap)": [3.0, 10.0],
    "offshelf (unconditional)": [0.3, 1.0],
    "offshelf": [0.1, 0.3],
}
GRIDS = {"eps": GRID, "flow": FLOW_GRID, "field": FIELD_GRID, "field_dit": FIELD_DIT_GRID,
         "classifiers": CLASSIFIER_GRID}

# The rows the search tunes, with the scale below which the method is no longer itself (exclusive): the CFG family's
# w = 1 is the conditional model, CFG++'s lambda, the classifier scales and GFCG's w at 0 are no guidance. The other
# rows (unguided rows, and variants of a tuned method with other settings) take the best of their grid.
TUNED: dict[str, float] = {"cfg": 1.0, "cfgpp": 0.0, "cfg_rescale": 1.0, "cfg_interval": 1.0, "apg": 1.0,
                           "adaptive": 1.0, "cfg_zero_star": 1.0, "autoguidance": 1.0, "classifier": 0.0,
                           "offshelf": 0.0, "gfcg": 0.0, "universal": 0.0, "classifier (ppap)": 0.0,
                           "offshelf (unconditional)": 0.0}

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
    # the field's grids: a schedule (same mean strength as the constant w), Imagen's thresholding, and the
    # compositions the literature uses (PAG on top of CFG; SLG on top of CFG, as SD3.5 does), CFG at w = 1.25
    "cfg (linear)": ("cfg", ["guidance.schedule=linear"]),
    "cfg (cosine)": ("cfg", ["guidance.schedule=cosine"]),
    "cfg (dynamic threshold)": ("cfg", ["sampler.dynamic_threshold=0.995"]),
    "pag + cfg": ("pag", ["guidance.cfg_scale=1.25"]),
    "slg + cfg": ("slg", ["guidance.cfg_scale=1.25"]),
    # FDG's paper guides the high band harder than the low one: the low band at CFG's best w, `scale` the high
    "fdg": ("fdg", ["guidance.scale_low=1.25"]),
    # the classifiers' grid: the PPAP experts in place of the noise-aware classifier (same rule, same base model)
    "classifier (ppap)": ("classifier", ["classifier=fmnist_ppap"]),
}

def point_dir(out: Path, name: str, scale) -> Path:
    folder = name.replace(" (", "_").replace(")", "").replace(" + ", "+").replace(" ", "_")
    return out / folder / ("default" if scale is None else f"scale_{scale:g}")


def read_point(out: Path, name: str, scale) -> dict | None:
    """A finished point's metrics, under the row's own name (variants share their method's `guidance`)."""
    metrics = point_dir(out, name, scale) / "metrics.json"
    return {**json.loads(metrics.read_text()), "guidance": name} if metrics.exists() else None


def run_point(out: Path, name: str, scale, num_samples: int, extra: list[str], rescore: bool = False) -> dict | None:
    """The point at `num_samples`: read when its metrics.json is at that count (and, with `rescore`, already has
    intervals), else run (samples already in the folder are reused; only the missing ones are made)."""
    guidance, variant = VARIANTS.get(name, (name, []))
    overrides = [f"guidance={guidance}", *variant, *([] if scale is None else [f"scale={scale}"]), *extra]
    if ensure_point(point_dir(out, name, scale), overrides, num_samples, out / "sweep.log", rescore) is None:
        return None
    return read_point(out, name, scale)


def ensure_point(folder: Path, overrides: list[str], num_samples: int, log_path: Path,
                 rescore: bool = False) -> dict | None:
    """The metrics of `python -m diffguide.run OVERRIDES num_samples=N out_dir=FOLDER logger=none`: read when the
    folder's metrics.json is at that count (and, with `rescore`, already has intervals), else run (samples already
    in the folder are reused; only the missing ones are made), its output appended to `log_path`. None when the run
    failed. scripts/distill_table.py runs its points through this too."""
    metrics = folder / "metrics.json"
    done = json.loads(metrics.read_text()) if metrics.exists() else None
    if done is None or done["num_samples"] != num_samples or (rescore and "fid_fmnist_lo" not in done):
        cmd = [sys.executable, "-m", "diffguide.run", *overrides, f"num_samples={num_samples}", f"out_dir={folder}",
               "logger=none"]
        print("+", " ".join(cmd[1:]), file=sys.stderr, flush=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                print(f"  failed: see {log_path}", file=sys.stderr)
                return None
        done = json.loads(metrics.read_text())
    return done


def _key(scale) -> str:
    return "default" if scale is None else f"{scale:g}"


def search(out: Path, name: str, grid: list, n: int, extra: list[str], extend: int, dry_run: bool,
           tune: bool = True) -> float | None:
    """The row's scale by the rule (module docstring), its FIDs at `n` samples recorded in OUT/tune.json as they
    come. None when no point of the row finished."""
    state_path = out / "tune.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    fids: dict[str, float] = state.setdefault(name, {})

    def fid(scale) -> float | None:
        if _key(scale) not in fids:
            point = (read_point(out, name, scale) if dry_run
                     else run_point(out, name, scale, n, extra))
            if point is None or point["num_samples"] != n:
                return None
            fids[_key(scale)] = point["fid_fmnist"]
            atomic_write_text(state_path, json.dumps(state, indent=2, sort_keys=True))
        return fids[_key(scale)]

    tried = {scale: fid(scale) for scale in grid}
    tried = {s: f for s, f in tried.items() if f is not None}
    if name in TUNED and len(tried) >= 2 and tune:
        lowest = TUNED[name]
        for _ in range(extend):
            scales = sorted(tried)
            best = min(scales, key=tried.get)
            if best == scales[0]:
                new = scales[0] - (scales[1] - scales[0])
                new = new if new > lowest else (lowest + scales[0]) / 2
            elif best == scales[-1]:
                new = scales[-1] + (scales[-1] - scales[-2])
            else:
                break
            value = fid(round(new, 4))
            if value is None:
                break
            tried[round(new, 4)] = value
        scales = sorted(tried)
        best = min(scales, key=tried.get)
        i = scales.index(best)
        neighbours = [scales[j] for j in (i - 1, i + 1) if 0 <= j < len(scales)]
        other = min(neighbours, key=tried.get)
        middle = round((best + other) / 2, 4)
        if middle not in tried:
            value = fid(middle)
            if value is not None:
                tried[middle] = value
    if not tried:
        return None
    return min(tried, key=lambda s: (tried[s], -1 if s is None else s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/method_table"))
    parser.add_argument("--tune-samples", type=int, default=1000, help="samples per point of the scale search")
    parser.add_argument("--num-samples", type=int, default=2000, help="samples per point of the table")
    parser.add_argument("--extend", type=int, default=2, help="most scales the search adds beyond a grid's end")
    parser.add_argument("--only", default="", help="comma-separated methods (default: all)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="eps", help="the points to run (flow: FLOW_GRID)")
    parser.add_argument("--grid-only", default="", help="comma-separated rows that take the best of their starting "
                        "grid, with no search (where the CPU's budget ends)")
    parser.add_argument("--dry-run", action="store_true", help="only tabulate the points already run")
    parser.add_argument("--rescore", action="store_true", help="score the table's points again (same samples)")
    parser.add_argument("extra", nargs="*", help="more overrides for every run, e.g. sampler=ddpm")
    args = parser.parse_args()
    grid = GRIDS[args.grid]
    names = [n for n in args.only.split(",") if n] or list(grid)
    unknown = [n for n in names if n not in grid]
    if unknown:
        sys.exit(f"unknown methods: {', '.join(unknown)} (known: {', '.join(grid)})")
    args.out.mkdir(parents=True, exist_ok=True)

    chosen = {}
    for name in names:
        # the flow column compares the models at the eps model's scales: its grid is taken as it is
        scale = search(args.out, name, grid[name], args.tune_samples, args.extra, args.extend, args.dry_run,
                       tune=args.grid in ("eps", "classifiers") and name not in args.grid_only.split(","))
        if scale is not None or None in grid[name]:
            chosen[name] = scale
    rows = []
    for name, scale in chosen.items():
        # the variants (a tuned method with other settings) stay at the search's sample count: the CPU's budget
        # goes to the rows the table compares
        count = args.tune_samples if name in VARIANTS and args.grid == "eps" else args.num_samples
        point = (read_point(args.out, name, scale) if args.dry_run
                 else run_point(args.out, name, scale, count, args.extra, args.rescore))
        if point is not None:
            rows.append(point)
    counts = sorted({r["num_samples"] for r in rows})
    print(f"## Each method at its tuned scale ({'/'.join(map(str, counts))} samples per point, seed 0)\n")
    for row in rows:
        row.update(_label=row["guidance"], _dir=str(point_dir(args.out, row["guidance"], row["scale"])),
                   status="done", seed=(row.get("config") or {}).get("seed"))
    text, notes = report.report(rows, "cfg")
    print(text)
    print("\n95% bootstrap intervals in brackets; Δ: paired difference to cfg at its tuned scale, * where its "
          "interval excludes 0")
    for note in notes:
        print(f"note: {note}")
    minutes = sum(r.get("wall_time_s", 0.0) for r in rows) / 60
    print(f"\n{len(rows)} points; their last runs took {minutes:.0f} min (sum of wall_time_s)")
    state_path = args.out / "tune.json"
    if state_path.exists():
        print(f"\n## The scale search (FID at {args.tune_samples} samples; chosen scale in bold)\n")
        print("| method | scales tried: FID |\n| --- | --- |")
        state = json.loads(state_path.read_text())
        for name in names:
            tried = state.get(name, {})
            if len(tried) > 1:
                cells = [(f"**{k}**" if _key(chosen.get(name)) == k else k) + f": {v:.2f}"
                         for k, v in sorted(tried.items(), key=lambda kv: float(kv[0]))]
                print(f"| {name} | {', '.join(cells)} |")


if __name__ == "__main__":
    main()
