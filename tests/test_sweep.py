"""A sweep with a bad point: the point is recorded as failed with its reason, the rest finish, the process exits
non-zero at the end, and diffguide.report tabulates and plots what finished."""

import csv
import json
import math

import pytest

from tests.helpers import run_cli


def test_a_bad_point_is_recorded_and_the_sweep_finishes_then_reported(tiny_unet_path, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("diffguide.run", "-m", "guidance=cfg", "scale=1e38,1.5,3", f"model.weights={tiny_unet_path}",
                   "metric=none", "logger=none", "steps=2", "num_samples=3", "precision=fp32",
                   "sampler.clip_x0=false", f"out_dir={sweep}")
    assert proc.returncode == 1
    assert "1 point(s) of the sweep failed" in proc.stderr
    [failed_path] = sweep.glob("*/failed.json")
    assert "scale=1e+38" in failed_path.parent.name
    failed = json.loads(failed_path.read_text())
    assert failed["guidance"] == "cfg" and failed["scale"] == 1e38 and "diverged to NaN/inf" in failed["reason"]
    done = sorted(json.loads(p.read_text())["scale"] for p in sweep.glob("*/metrics.json"))
    assert done == [1.5, 3.0]

    report = run_cli("diffguide.report", str(sweep))
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((sweep / "report" / "report.csv").open()))
    assert sorted((r["status"], r["scale"]) for r in rows) == [("done", "1.5"), ("done", "3.0"), ("failed", "1e+38")]
    assert (sweep / "report" / "fid_vs_nfe.png").exists() is False  # metric=none: no FID to plot
    assert (sweep / "report" / "samples_cfg.png").is_file()
    assert "1 failed" in report.stdout


def test_report_draws_the_papers_plots_from_metrics(tmp_path):
    """Three hand-made points of two methods: the CSV keeps every value, and each plot is written."""
    from diffguide.report import main

    for guidance, scale, fid, isc in (("cfg", 1.5, 3.0, 8.0), ("cfg", 2.0, 4.0, 9.0), ("apg", 2.0, 2.5, 8.5)):
        job = tmp_path / f"{guidance}-{scale}"
        job.mkdir()
        (job / "metrics.json").write_text(json.dumps({
            "guidance": guidance, "scale": scale, "sampler": "ddim", "steps": 25, "fid_x": fid, "isc_x": isc,
            "precision_x": 0.7, "recall_x": 0.6, "nfe": 50.0, "num_samples": 10, "config": {"ignored": 1}}))
    assert main([str(tmp_path)]) == 0
    rows = {(r["guidance"], r["scale"]): r for r in csv.DictReader((tmp_path / "report" / "report.csv").open())}
    assert float(rows[("cfg", "2.0")]["fid_x"]) == 4.0 and float(rows[("apg", "2.0")]["isc_x"]) == 8.5
    assert "config" not in rows[("cfg", "1.5")]
    for name in ("fid_vs_scale.png", "fid_vs_is.png", "precision_recall.png", "fid_vs_nfe.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000


def test_results_name_finished_and_failed_points_alike_and_a_finish_clears_the_failure(tmp_path):
    """failed.json names a point as metrics.json does (the method's own name, the resolved scale, the sampler, the
    steps); a later finish removes it; the reader lists finished points, then failed ones, skipping what it is told."""
    from omegaconf import OmegaConf

    from diffguide.store import results

    cfg = OmegaConf.create({"scale": 2.5, "steps": 4, "sampler": {"_target_": "diffguide.samplers.ddim.DDIM"},
                            "guidance": {"_target_": "diffguide.guidance.cfg.CFG", "scale": "${scale}"}})
    for job in ("a", "b"):
        results.record_failure(tmp_path / job, cfg, "sampling diverged", ["scale=2.5"])
    results.write_metrics(tmp_path / "b", {**results.point("cfg", 2.5, "ddim", 4), "nfe": 8.0})
    results.write_metrics(tmp_path / "report" / "c", results.point("cfg", 1.0, "ddim", 4))
    found, skipped = results.read(tmp_path, skip=frozenset({"report"}))
    assert skipped == []
    assert [(p.folder.name, p.status) for p in found] == [("b", "done"), ("a", "failed")]
    assert not (tmp_path / "b" / results.FAILED).exists()
    done, failed = (p.record for p in found)
    shared = {"guidance": "cfg", "scale": 2.5, "sampler": "ddim", "steps": 4}
    assert {k: failed[k] for k in done if k != "nfe"} == shared
    assert failed["reason"] == "sampling diverged" and failed["overrides"] == ["scale=2.5"]


@pytest.mark.slow  # ~20 s: an Optuna search of 4 trials, then its rerun
def test_a_scale_search_with_optunas_sweeper_minimises_fid_and_resumes(tiny_unet_path, tiny_evaluator_path,
                                                                        fidelity_cache, tmp_path):
    """hydra/sweeper=tune: every trial is an ordinary run folder named by its scale, the sweep's best value is the
    lowest FID among them (optimization_results.yaml), and the same command again asks for the same scales (seeded
    TPE) and finds them done: nothing is sampled again."""
    import yaml

    sweep = tmp_path / "tune"
    args = ["-m", "hydra/sweeper=tune", "scale=interval(1,3)", "hydra.sweeper.n_trials=3",
            f"model.weights={tiny_unet_path}", f"metric.evaluator={tiny_evaluator_path}",
            f"metric.cache_root={fidelity_cache}", "metric.isc_splits=1", "metric.kid_subset_size=4",
            "metric.bootstrap=50", "logger=none", "steps=2", "num_samples=8", "batch_size=8", f"out_dir={sweep}"]
    first = run_cli("diffguide.run", *args)
    assert first.returncode == 0, first.stderr
    points = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert len(points) == 3 and all(name.startswith("scale=") for name in points)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    lowest = min(points.values(), key=lambda p: p["fid_fmnist"])
    assert best["best_value"] == lowest["fid_fmnist"] and best["best_params"]["scale"] == lowest["scale"]
    again = run_cli("diffguide.run", *args)
    assert again.returncode == 0, again.stderr
    rerun = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert rerun.keys() == points.keys() and all(p["images_generated"] == 0 for p in rerun.values())


def test_the_search_objective_is_fid_or_fid_at_a_class_accuracy_floor():
    from omegaconf import OmegaConf

    from diffguide.run import objective

    result = {"fid_fmnist": 2.5, "fid_fmnist_lo": 2.0, "fid_inf_fmnist": 1.9, "class_accuracy": 0.90}
    assert objective(result, OmegaConf.create({"metric": None, "min_class_accuracy": None})) == 2.5
    assert objective(result, OmegaConf.create({"metric": None, "min_class_accuracy": 0.92})) == pytest.approx(4.5)
    assert objective(result, OmegaConf.create({"metric": None, "min_class_accuracy": 0.85})) == 2.5
    assert objective(result, OmegaConf.create({"metric": "fid_inf_fmnist", "min_class_accuracy": None})) == 1.9
    assert math.isnan(objective({"nfe": 50}, OmegaConf.create({"metric": None, "min_class_accuracy": None})))
