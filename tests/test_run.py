"""The run pipeline on a tiny UNet: per-sample seeds, resumption, what it writes."""

import csv
import json

import pytest

from diffguide.errors import UserError


def _pngs(out_dir):
    return {p.name: p.read_bytes() for p in sorted((out_dir / "samples").glob("*.png"))}


def test_images_do_not_depend_on_batch_size(run_diffguide, tmp_path):
    """DDPM draws fresh noise every step and CFG doubles the batch: still byte-identical PNGs at batch 1 and 7."""
    args = ("sampler=ddpm", "guidance=cfg", "scale=2.5", "num_samples=7")
    run_diffguide(tmp_path / "b1", *args, "batch_size=1")
    run_diffguide(tmp_path / "b7", *args, "batch_size=7")
    one, seven = _pngs(tmp_path / "b1"), _pngs(tmp_path / "b7")
    assert len(one) == 7 and one == seven
    assert len(set(one.values())) == 7, "each sample must have its own seed"


def test_resume_makes_only_the_missing_samples(run_diffguide, tmp_path):
    out = tmp_path / "run"
    first = run_diffguide(out, "num_samples=10", "sampler=ddpm")
    reference = _pngs(out)
    for index in (0, 4, 9):
        (out / "samples" / f"{index:06d}.png").unlink()
    (out / "samples" / ".000004.png.abc.tmp").write_bytes(b"half a png")  # as a killed run leaves it
    second = run_diffguide(out, "num_samples=10", "sampler=ddpm")
    assert first["images_generated"] == 10 and second["images_generated"] == 3
    assert _pngs(out) == reference
    assert not list((out / "samples").glob(".*.tmp"))
    # Growing the run keeps the first ten and adds the rest.
    third = run_diffguide(out, "num_samples=12", "sampler=ddpm")
    assert third["images_generated"] == 2 and {k: v for k, v in _pngs(out).items() if k in reference} == reference
    # the cost of the folder's images over every run that made them
    assert third["images_generated_total"] == 15
    assert third["sampling_wall_s_total"] == pytest.approx(sum(r["sampling_wall_s"] for r in (first, second, third)),
                                                           abs=2e-3)
    assert third["sampling_s_per_image"] == pytest.approx(third["sampling_wall_s_total"] / 15, abs=1e-4)


def test_resume_refuses_samples_made_with_other_settings(run_diffguide, tmp_path):
    out = tmp_path / "run"
    run_diffguide(out, "guidance=cfg", "scale=2.0")
    with pytest.raises(UserError, match="guidance"):
        run_diffguide(out, "guidance=cfg", "scale=3.0")
    # Batch size and device split do not change the images: those may differ.
    assert run_diffguide(out, "guidance=cfg", "scale=2.0", "batch_size=1")["images_generated"] == 0


def test_the_same_weights_at_another_path_resume_but_other_weights_do_not(run_diffguide, tiny_unet_path, tmp_path):
    """A moved checkout (or the same weights under another mount point): the file's content digest is unchanged,
    so the folder resumes with nothing remade; a file with other content at the same place is refused."""
    import shutil

    out = tmp_path / "run"
    moved = tmp_path / "elsewhere" / "unet.safetensors"
    moved.parent.mkdir()
    shutil.copy(tiny_unet_path, moved)
    run_diffguide(out, "guidance=cfg", "scale=2.0", "num_samples=6")
    first = _pngs(out)
    again = run_diffguide(out, "guidance=cfg", "scale=2.0", "num_samples=8", f"model.weights={moved}")
    assert again["images_generated"] == 2 and {k: v for k, v in _pngs(out).items() if k in first} == first
    import torch

    from diffguide.models import unet as unet_lib
    from tests.helpers import SCHEDULE, TINY_UNET

    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    unet_lib.save(unet_lib.build(TINY_UNET, 10, SCHEDULE), other)
    with pytest.raises(UserError, match="model.weights"):
        run_diffguide(out, "guidance=cfg", "scale=2.0", f"model.weights={other}")


def test_keys_added_later_leave_older_folders_resumable(run_diffguide, tmp_path):
    """A folder made before sampler.variance and guidance.channels existed recorded neither: at their defaults they
    stay out of the fingerprint, so its sampling.json and every sample's run digest still match and nothing is
    remade; a non-default value is a different run."""
    import json

    out = tmp_path / "run"
    run_diffguide(out, "guidance=cfg", "sampler=ddpm")
    recorded = json.loads((out / "sampling.json").read_text())
    assert "channels" not in recorded["guidance"] and "variance" not in recorded["sampler"]
    assert run_diffguide(out, "guidance=cfg", "sampler=ddpm")["images_generated"] == 0
    with pytest.raises(UserError, match="guidance.channels: .unset. there, 1 now"):
        run_diffguide(out, "guidance=cfg", "sampler=ddpm", "guidance.channels=1")


def test_samples_made_before_a_methods_correction_are_not_resumed(run_diffguide, tmp_path):
    """guidance=cfg_zero_star's zero-init was corrected (revision 1): a folder whose sampling.json was recorded by
    the uncorrected code (no _revision) is refused in one line that says so, rather than mixed with new samples."""
    import json

    out = tmp_path / "run"
    run_diffguide(out, "guidance=cfg_zero_star")
    path = out / "sampling.json"
    recorded = json.loads(path.read_text())
    assert recorded["guidance"]["_revision"] == 1
    del recorded["guidance"]["_revision"]
    path.write_text(json.dumps(recorded))
    with pytest.raises(UserError, match="guidance's code was corrected since those samples were made"):
        run_diffguide(out, "guidance=cfg_zero_star")


@pytest.mark.parametrize("guidance, scale, nfe_per_step", [("none", 1.0, 1), ("cfg", 2.0, 2), ("cfg", 1.0, 1),
                                                           ("cfgpp", 0.6, 2)])
def test_metrics_json_and_labels(run_diffguide, tmp_path, guidance, scale, nfe_per_step):
    out = tmp_path / "run"
    result = run_diffguide(out, f"guidance={guidance}", f"scale={scale}", "steps=4", "num_samples=12")
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["nfe"] == result["nfe"] == 4 * nfe_per_step
    assert on_disk["num_samples"] == 12 and on_disk["config"]["guidance"]["_target_"].startswith("diffguide")
    rows = list(csv.DictReader((out / "labels.csv").open()))
    assert [int(r["label"]) for r in rows] == [i % 10 for i in range(12)]
    assert [int(r["seed"]) for r in rows] == list(range(12))
    assert (out / "grid.png").is_file() and (out / "config.resolved.yaml").is_file()


def test_the_scale_shortcut_reaches_the_guidance_and_null_means_its_default(tmp_path):
    from tests.helpers import compose_run_config

    assert compose_run_config(["guidance=cfgpp"], tmp_path).guidance.scale == 0.6
    assert compose_run_config(["guidance=cfg"], tmp_path).guidance.scale == 2.0
    assert compose_run_config(["guidance=cfg", "scale=4.5"], tmp_path).guidance.scale == 4.5
    assert compose_run_config(["steps=7", "sampler=dpmpp_2m"], tmp_path).sampler.steps == 7


def test_written_files_are_readable_by_others(run_diffguide, tmp_path):
    out = tmp_path / "run"
    run_diffguide(out)
    for path in (out / "samples" / "000000.png", out / "metrics.json", out / "grid.png"):
        assert path.stat().st_mode & 0o044 == 0o044, path


def test_multirun_sweep_writes_one_folder_per_job(tiny_unet_path, tmp_path):
    from tests.helpers import run_cli

    sweep = tmp_path / "sweep"
    proc = run_cli("diffguide.run", "-m", "guidance=cfg,cfgpp", "scale=0.5,1.5", f"model.weights={tiny_unet_path}",
                   "metric=none", "logger=none", "steps=2", "num_samples=3", f"out_dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    assert jobs == ["guidance=cfg,scale=0.5,steps=2", "guidance=cfg,scale=1.5,steps=2",
                    "guidance=cfgpp,scale=0.5,steps=2", "guidance=cfgpp,scale=1.5,steps=2"]
    scales = {json.loads((sweep / job / "metrics.json").read_text())["config"]["guidance"]["scale"] for job in jobs}
    assert scales == {0.5, 1.5}


def test_per_sample_network_evaluations_reach_labels_and_metrics(run_diffguide, tmp_path):
    out = tmp_path / "run"
    result = run_diffguide(out, "guidance=adaptive", "guidance.gamma=0.5", "steps=6", "num_samples=5")
    rows = list(csv.DictReader((out / "labels.csv").open()))
    per_sample = [float(r["nfe"]) for r in rows]
    assert all(7 <= n <= 12 for n in per_sample)
    assert result["nfe"] == pytest.approx(sum(per_sample) / 5)


def test_a_diverging_run_stops_with_a_clear_error_and_writes_no_garbage(run_diffguide, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="diverged to NaN/inf"):
        run_diffguide(out, "guidance=cfg", "scale=1e38", "precision=fp32", "sampler.clip_x0=false")
    assert not list((out / "samples").glob("*.png"))
