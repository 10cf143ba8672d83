"""diffguide.report: intervals in the table, paired differences to a baseline with significance marks, seeds
aggregated, and the trade-off plots with interval bars; on hand-made points whose features are synthetic."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import t as student_t

from diffguide import report
from diffguide.metrics import intervals as iv


def _point(folder, guidance, scale, features, reference, labels, seed=0, correct=None, model=None):
    """A finished point: features.npz from `features`, metrics.json from the same statistics on the full sample."""
    folder.mkdir(parents=True)
    stats = iv.PointStats(labels=np.asarray(labels))
    ref_mu, ref_sigma = reference.mean(0), np.cov(reference, rowvar=False)
    stats.features, stats.ref_mu, stats.ref_sigma = features, ref_mu, ref_sigma
    stats.in_reference, stats.covers = iv.prc_terms(torch.from_numpy(features), torch.from_numpy(reference))
    stats.n_reference = len(reference)
    stats.correct = np.asarray(correct if correct is not None else np.ones(len(labels), bool))
    stats.save(folder / "features.npz")
    ones = np.ones((1, len(labels)))
    estimates = {name: float(iv.replicates(stats, name, ones)[0]) for name in ("fid", "precision", "recall")}
    estimates["class_accuracy"] = float(stats.correct.mean())
    record = {"guidance": guidance, "scale": scale, "sampler": "ddim", "steps": 25, "nfe": 50.0,
              "num_samples": len(labels), "wall_time_s": 10.0, "config": {"seed": seed, "guidance": {"scale": scale}}}
    if model is not None:
        record["config"]["model"] = {"_target_": "diffguide.models.student.load", "weights": f"/w/{model}.safetensors"}
    for name, value in estimates.items():
        key = name if name == "class_accuracy" else f"{name}_x"
        record[key] = value
        record[f"{key}_lo"], record[f"{key}_hi"] = iv.intervals(stats, {name: value}, 300)[name]
    (folder / "metrics.json").write_text(json.dumps(record))
    return record


@pytest.fixture
def sweep(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 300, 6
    reference = rng.normal(0, 1, (1000, d))
    base = rng.normal(0.1, 1, (n, d))
    labels = np.arange(n) % 10
    _point(tmp_path / "cfg-1.5", "cfg", 1.5, base, reference, labels)
    _point(tmp_path / "cfg-2", "cfg", 2.0, base + 0.4, reference, labels)       # far worse: significant
    # the same samples in another order: the same FID, and a paired difference that is noise only
    _point(tmp_path / "apg-2", "apg", 2.0, base[rng.permutation(n)], reference, labels)
    return tmp_path


def test_table_has_intervals_and_marks_only_what_the_paired_interval_separates(sweep):
    """cfg 1.5 (the lowest FID of cfg) is the baseline; cfg 2 is worse with a paired interval above 0 (marked *);
    apg, whose samples are the baseline's in another order, has a FID difference whose interval holds 0 (no mark)."""
    rows = [r for r in report.collect(sweep)[0] if r["status"] == "done"]
    text, notes = report.report(rows, "cfg")
    assert next(line for line in text.splitlines() if line.startswith("| cfg | 1.5 |")).split("|")[8].strip() \
        == "baseline"
    worse = next(r for r in rows if r["guidance"] == "cfg" and r["scale"] == 2.0)
    apg = next(r for r in rows if r["guidance"] == "apg")
    assert worse["delta_fid_x_lo"] > 0 and worse["delta_fid_x"] == pytest.approx(worse["fid_x"] - _fid(rows, 1.5))
    assert apg["delta_fid_x_lo"] < 0 < apg["delta_fid_x_hi"]
    table = text.splitlines()
    row_worse = next(line for line in table if line.startswith("| cfg | 2 |"))
    row_apg = next(line for line in table if line.startswith("| apg | 2 |"))
    assert " *" in row_worse.split("|")[8] and "*" not in row_apg
    assert f"[{worse['fid_x_lo']:.2f}, {worse['fid_x_hi']:.2f}]" in row_worse  # the point's own interval
    assert not notes


def _fid(rows, scale):
    return next(r["fid_x"] for r in rows if r["guidance"] == "cfg" and r["scale"] == scale)


def test_the_baseline_against_itself_is_exactly_zero(sweep):
    rows = [r for r in report.collect(sweep)[0] if r["status"] == "done"]
    table = report.settings(rows)
    baseline = report.choose_baseline(table, "cfg")
    assert baseline == ("cfg", 1.5)
    diffs = report.differences(table[baseline], table[baseline])
    assert diffs and all(d == (0.0, 0.0, 0.0) for d in diffs.values())
    assert report.choose_baseline(table, "cfg@2") == ("cfg", 2.0)


def test_seeds_are_aggregated_with_a_t_interval(tmp_path):
    """Three seeds of one setting: the mean, the sd and mean +- t(0.975, 2) sd / sqrt(3)."""
    rng = np.random.default_rng(1)
    reference = rng.normal(0, 1, (500, 4))
    fids = []
    for seed in (0, 1000, 2000):
        record = _point(tmp_path / f"s{seed}", "cfg", 1.5, rng.normal(0.2, 1, (200, 4)), reference,
                        np.arange(200) % 10, seed=seed)
        fids.append(record["fid_x"])
    rows = report.collect(tmp_path)[0]
    table = report.settings(rows)
    assert list(table) == [("cfg", 1.5)]
    value, low, high, spread = report.aggregate(table[("cfg", 1.5)], "fid")
    half = student_t.ppf(0.975, 2) * np.std(fids, ddof=1) / math.sqrt(3)
    assert value == pytest.approx(np.mean(fids)) and spread == pytest.approx(np.std(fids, ddof=1))
    assert (low, high) == pytest.approx((np.mean(fids) - half, np.mean(fids) + half))
    text, notes = report.report(rows, "cfg")
    assert "0,1000,2000" in text and not notes


def test_points_of_two_models_at_one_scale_are_two_curves_not_two_seeds(tmp_path):
    """A sweep over students (model=fmnist_guided_student,fmnist_guided_student_lora guidance=distilled scale=2):
    the same method, scale and seed on two models are two settings, each named by its weights file."""
    rng = np.random.default_rng(2)
    reference = rng.normal(0, 1, (500, 4))
    for model in ("fmnist_guided_student", "fmnist_guided_student_lora"):
        _point(tmp_path / model, "distilled", 2.0, rng.normal(0.2, 1, (200, 4)), reference, np.arange(200) % 10,
               model=model)
    table = report.settings(report.collect(tmp_path)[0])
    assert sorted(table) == [("distilled model=fmnist_guided_student", 2.0),
                             ("distilled model=fmnist_guided_student_lora", 2.0)]
    assert all(len(points) == 1 for points in table.values())


def test_overlapping_seeds_are_named(tmp_path):
    rng = np.random.default_rng(2)
    reference = rng.normal(0, 1, (300, 4))
    for seed in (0, 1):
        _point(tmp_path / f"s{seed}", "cfg", 1.5, rng.normal(0, 1, (100, 4)), reference, np.zeros(100), seed=seed)
    _, notes = report.report(report.collect(tmp_path)[0], "cfg")
    assert any("seeds 0 and 1 share samples" in n for n in notes)


def test_report_command_writes_table_csv_and_plots_with_their_metric_names(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| method | scale | N |" in out and "fid_x" in out and "Δfid vs cfg 1.5" in out
    rows = {(r["guidance"], r["scale"]): r for r in csv.DictReader((sweep / "report" / "report.csv").open())}
    assert float(rows[("cfg", "2.0")]["delta_fid_x_lo"]) > 0
    for name in ("fid_vs_scale.png", "fid_vs_class_accuracy.png", "precision_recall.png", "fid_vs_nfe.png"):
        assert (sweep / "report" / name).stat().st_size > 1000
    assert (sweep / "report" / "report.md").read_text().startswith("| method |")
    table = report.settings([r for r in report.collect(sweep)[0] if r["status"] == "done"])
    assert report._axis(table[("cfg", 1.5)], "precision", 1.5)[4] == "precision_x"  # axis named by its column


def test_pareto_front():
    points = [(0.9, 3.0), (0.8, 2.0), (0.95, 5.0), (0.85, 4.0), (0.7, 2.5)]
    # higher accuracy and lower FID are better: (0.85, 4.0) is beaten by (0.9, 3.0), (0.7, 2.5) by (0.8, 2.0)
    assert report.pareto(points, 1, -1) == [(0.8, 2.0), (0.9, 3.0), (0.95, 5.0)]


def test_a_baseline_with_more_samples_is_cut_to_the_points_own(tmp_path):
    """A point of 200 samples against a baseline of 300 with the same seed: its partners are the baseline's first
    200, and the FID difference is computed on them (FID of the point minus FID of the baseline's first 200)."""
    rng = np.random.default_rng(3)
    reference = rng.normal(0, 1, (600, 4))
    base = rng.normal(0.1, 1, (300, 4))
    labels = np.arange(300) % 10
    _point(tmp_path / "cfg", "cfg", 1.5, base, reference, labels)
    _point(tmp_path / "apg", "apg", 2.0, base[:200] + 0.3, reference, labels[:200])
    rows = report.collect(tmp_path)[0]
    table = report.settings(rows)
    diffs = report.differences(table[("apg", 2.0)], table[("cfg", 1.5)])
    assert set(diffs) == {"fid", "precision", "class_accuracy"}
    ref = (reference.mean(0), np.cov(reference, rowvar=False))
    expected = (iv.fid_replicates(base[:200] + 0.3, *ref, np.ones((1, 200)))[0]
                - iv.fid_replicates(base[:200], *ref, np.ones((1, 200)))[0])
    assert diffs["fid"][0] == pytest.approx(expected) and diffs["fid"][1] > 0


def test_a_statistics_column_is_neither_its_bounds_nor_fid_infinity():
    """Inception metrics have no suffix: fid, fid_lo, fid_inf sit side by side and only fid is FID's column."""
    assert [k for k in ("fid", "fid_lo", "fid_hi", "fid_inf", "fid_inf_lo", "fid_fmnist", "fid_dinov2")
            if report.key_of("fid", k)] == ["fid", "fid_fmnist", "fid_dinov2"]
    assert report.column({"precision_lo": 0.1, "precision": 0.2}, "precision") == "precision"


# --- a damaged point, met as a user meets it: `python -m diffguide.report SWEEP` in a subprocess ---

class _Planted:
    """A pickle that would write a file if it were ever unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _damage(folder, kind, tmp_path):
    metrics, features = folder / "metrics.json", folder / "features.npz"
    if kind == "metrics garbage":
        metrics.write_bytes(b"\x00\xffnot json at all")
    elif kind == "metrics truncated":
        metrics.write_bytes(metrics.read_bytes()[:40])
    elif kind == "metrics null":
        metrics.write_text("null")
    elif kind == "metrics list":
        metrics.write_text("[1, 2]")
    elif kind == "metrics bad scale":
        metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "scale": "2; rm -rf"}))
    elif kind == "features truncated":
        features.write_bytes(features.read_bytes()[:100])
    elif kind == "features garbage":
        features.write_bytes(b"PK\x03\x04 garbage")
    elif kind == "features object array":
        np.savez(features, labels=np.array([_Planted(tmp_path / "pwned")] * 3, dtype=object))
    elif kind == "features ragged":
        np.savez(features, labels=np.arange(5), features=np.zeros((4, 2)))
    elif kind == "failed garbage":
        metrics.unlink()
        (folder / "failed.json").write_bytes(b"{{{")
    return metrics if kind.startswith("metrics") else features if kind.startswith("features") else \
        folder / "failed.json"


POINT_DAMAGE = ["metrics garbage", "metrics truncated", "metrics null", "metrics list", "metrics bad scale",
                "failed garbage"]
FEATURE_DAMAGE = ["features truncated", "features garbage", "features object array", "features ragged"]


FAST = {"metrics garbage", "metrics null", "failed garbage", "features object array"}  # the rest: make test-slow


@pytest.mark.parametrize("kind", [k if k in FAST else pytest.param(k, marks=pytest.mark.slow)
                                  for k in POINT_DAMAGE + FEATURE_DAMAGE])
def test_a_damaged_point_is_skipped_with_one_warning_and_the_rest_is_reported(sweep, kind, tmp_path):
    """One warning line on stderr naming the damaged file, the other points in the table and the CSV, exit 1 (the
    report is not of everything); a damaged features.npz keeps its point in the table without paired differences;
    nothing in a damaged file is unpickled."""
    from tests.helpers import run_cli

    damaged = _damage(sweep / "apg-2", kind, tmp_path)
    proc = run_cli("diffguide.report", str(sweep))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffguide: warning: ") and str(damaged) in lines[0], proc.stderr
    rows = {(r["guidance"], r["scale"]) for r in csv.DictReader((sweep / "report" / "report.csv").open())}
    assert {("cfg", "1.5"), ("cfg", "2.0")} <= rows
    assert (("apg", "2.0") in rows) == (kind in FEATURE_DAMAGE)
    assert "| cfg | 2 |" in proc.stdout
    assert not (tmp_path / "pwned").exists()


def test_nothing_read_from_a_run_folder_becomes_a_path(tmp_path):
    """A metrics.json whose method is named `../../x` (and a sample to draw): the strip is written inside the
    report folder under a sanitised name, and nothing appears outside it."""
    from PIL import Image

    from tests.helpers import run_cli

    sweep = tmp_path / "sweep"
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, (200, 4))
    _point(sweep / "p", "../../x", 1.0, rng.normal(0, 1, (50, 4)), reference, np.arange(50) % 10)
    (sweep / "p" / "samples").mkdir()
    Image.new("L", (28, 28), 128).save(sweep / "p" / "samples" / "000000.png")
    before = sorted(p for p in tmp_path.rglob("*"))
    proc = run_cli("diffguide.report", str(sweep))
    assert proc.returncode == 0, proc.stderr
    made = sorted(set(tmp_path.rglob("*")) - set(before))
    assert made and all((sweep / "report") in p.parents or p == sweep / "report" for p in made), made
    assert (sweep / "report" / "samples_x.png").is_file()
    assert report.safe_name("../../etc/passwd") == "etc_passwd" and report.safe_name("..") == "method"
