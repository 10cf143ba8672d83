"""A markdown table of every job's metrics.json under the given run or sweep folders.

    python scripts/results_table.py outputs/readme/sweep [more folders ...]
"""

import json
import sys
from pathlib import Path

COLUMNS = [("guidance", None), ("scale", None), ("sampler", None), ("steps", None), ("fid_fmnist", "{:.2f}"), ("isc_fmnist", "{:.3f}"),
           ("kid_fmnist", "{:.4f}"), ("precision_fmnist", "{:.3f}"), ("recall_fmnist", "{:.3f}"),
           ("class_accuracy", "{:.3f}"), ("nfe", "{:.1f}"), ("images_per_s", "{:.0f}")]


def rows(folders):
    for folder in folders:
        for path in sorted(Path(folder).rglob("metrics.json")):
            result = json.loads(path.read_text())
            yield {**result, "scale": "" if result.get("scale") is None else result["scale"]}


def main(folders):
    found = sorted(rows(folders), key=lambda r: (r["guidance"], r["scale"] if r["scale"] != "" else -1))
    if not found:
        sys.exit(f"no metrics.json under {' '.join(folders)}")
    print("| " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|" + " --- |" * len(COLUMNS))
    for row in found:
        cells = [("" if row.get(name) is None else fmt.format(row[name]) if fmt else str(row[name]))
                 for name, fmt in COLUMNS]
        print("| " + " | ".join(cells) + " |")
    samples = {row["num_samples"] for row in found}
    print(f"\n{len(found)} runs, {'/'.join(map(str, sorted(samples)))} samples each")


if __name__ == "__main__":
    main(sys.argv[1:] or ["outputs"])
