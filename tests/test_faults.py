"""Nothing a user does, and no crash, corrupts, mixes or blocks a run: damaged samples are remade on resume, a lost
record of the settings is rebuilt, changed weights are refused by name, two runs never share a folder, and a kill at
any write, a Ctrl-C or a full disk leaves the run resumable with no temp file anywhere."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffguide.store import checkpoint
from diffguide.errors import UserError
from diffguide.models import unet as unet_lib
from tests.helpers import ROOT, SCHEDULE, TINY_UNET, interruptible

ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "samples").glob("*.png")) if p.is_file()}


def temp_files(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in Path(folder).rglob(".*.tmp")]


def lines(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").split("\n") if line.strip()]


# --- resume checks every sample it keeps -------------------------------------------------------------------------

def test_resume_remakes_damaged_swapped_and_foreign_samples(run_diffguide, tmp_path, capsys):
    out = tmp_path / "run"
    run_diffguide(out, "num_samples=12")
    reference = pngs(out)
    samples = out / "samples"
    (samples / "000001.png").write_bytes(reference["000001.png"][:60])            # truncated
    (samples / "000002.png").write_bytes(b"")                                      # empty
    (samples / "000007.png").write_bytes(b"not a png at all")                      # garbage
    (samples / "000003.png").write_bytes(reference["000005.png"])                 # swapped
    (samples / "000005.png").write_bytes(reference["000003.png"])
    Image.new("L", (14, 14)).save(samples / "000008.png")                          # wrong size, no metadata
    capsys.readouterr()

    result = run_diffguide(out, "num_samples=12")
    assert result["images_generated"] == 6
    assert pngs(out) == reference  # remade byte for byte: each sample has its own seed
    err = capsys.readouterr().err
    assert "6 existing sample(s) are damaged or not this run's and will be made again" in err
    assert "000003.png: made as sample 5" in err


def test_a_folder_under_a_samples_name_is_named_not_deleted(run_diffguide, tmp_path):
    out = tmp_path / "run"
    run_diffguide(out, "num_samples=6")
    (out / "samples" / "000009.png").mkdir()
    with pytest.raises(UserError, match=r"000009.png is not a file; move it out of"):
        run_diffguide(out, "num_samples=12")
    assert (out / "samples" / "000009.png").is_dir() and len(pngs(out)) == 6


def test_a_sample_of_another_run_is_remade(run_diffguide, tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    run_diffguide(ours, "num_samples=6")
    run_diffguide(theirs, "num_samples=6", "scale=3")
    reference = pngs(ours)
    shutil.copy(theirs / "samples" / "000004.png", ours / "samples" / "000004.png")  # right index, other settings
    assert run_diffguide(ours, "num_samples=6")["images_generated"] == 1
    assert pngs(ours) == reference


@pytest.mark.parametrize("damage", ["deleted", "truncated", "garbage"])
def test_a_lost_sampling_json_is_rebuilt_from_the_samples(run_diffguide, tmp_path, damage, capsys):
    out = tmp_path / "run"
    run_diffguide(out, "num_samples=6")
    record = (out / "sampling.json").read_text()
    if damage == "deleted":
        (out / "sampling.json").unlink()
    else:
        (out / "sampling.json").write_text(record[:40] if damage == "truncated" else "\x00\x17garbage")
    assert run_diffguide(out, "num_samples=8")["images_generated"] == 2
    assert (out / "sampling.json").read_text() == record
    assert "rebuilt it from the samples" in capsys.readouterr().err
    # ... but only when the samples say they were made with these settings
    (out / "sampling.json").unlink()
    with pytest.raises(UserError, match="sampling.json is missing and the samples .* were not all made"):
        run_diffguide(out, "num_samples=8", "scale=3")


def test_a_folder_without_samples_accepts_new_settings(run_diffguide, tmp_path):
    """A run that diverged to NaN wrote nothing; the same out_dir takes the corrected scale."""
    out = tmp_path / "run"
    with pytest.raises(UserError, match="diverged"):
        run_diffguide(out, "scale=1e38", "precision=fp32", "sampler.clip_x0=false")
    assert not list((out / "samples").glob("*.png"))
    assert run_diffguide(out, "scale=2")["images_generated"] == 6
    with pytest.raises(UserError, match=r"other settings \(guidance.scale: 2.0 there, 3.0 now\)"):
        run_diffguide(out, "scale=3")


# --- every file the images depend on is fingerprinted; damaged weights are refused --------------------------------

def _tiny_unet(path: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    unet_lib.save(unet_lib.build(TINY_UNET, 10, SCHEDULE), path)
    return path


def test_changed_weak_model_weights_refuse_the_resume_naming_the_file(run_diffguide, tmp_path):
    weak = _tiny_unet(tmp_path / "weak.safetensors", seed=1)
    out = tmp_path / "run"
    args = ("guidance=autoguidance", f"guidance.weak_model.weights={weak}")
    run_diffguide(out, *args, "num_samples=4")
    _tiny_unet(weak, seed=2)  # retrained in place, as `python -m diffguide.train` does
    with pytest.raises(UserError, match=rf"guidance.weak_model.weights \({weak}\) changed since those samples"):
        run_diffguide(out, *args, "num_samples=8")
    assert len(pngs(out)) == 4


def test_a_damaged_checkpoint_is_refused(tmp_path):
    path = _tiny_unet(tmp_path / "unet.safetensors", seed=0)
    checkpoint.load(path, unet_lib.KIND)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one flipped bit in the tensor data
    path.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="is damaged: its tensor data does not match the sha256"):
        checkpoint.load(path, unet_lib.KIND)
    path.write_bytes(bytes(blob[: len(blob) // 3]))
    with pytest.raises(UserError, match="not a whole safetensors file"):
        checkpoint.load(path, unet_lib.KIND)


def test_every_committed_checkpoint_carries_its_digest():
    from safetensors import safe_open

    files = sorted((ROOT / "diffguide" / "weights").glob("*.safetensors"))
    # the five of fmnist_unet and its companions, fmnist_flow, the four distilled students (stage 1, LoRA, 8 and
    # 4 steps), fmnist_dit and fmnist_ppap (PPAP's experts)
    assert len(files) == 12
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        assert len(metadata["data_sha256"]) == 64, path
        checkpoint.load(path, metadata["kind"])  # matches


# --- one run per folder -------------------------------------------------------------------------------------------

def _cli(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "diffguide.run", *args], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=interruptible, **kwargs)


def _wait_for(predicate, seconds=120):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.slow  # make test-slow: the suite's time (the same promise as its siblings in make test)
def test_a_second_run_on_a_busy_folder_refuses_naming_the_holder(tiny_unet_path, tmp_path):
    out = tmp_path / "run"
    args = [f"model.weights={tiny_unet_path}", "metric=none", "logger=none", "steps=50", "num_samples=5000",
            "batch_size=2", f"out_dir={out}"]
    first = _cli(args)
    _wait_for(lambda: len(list((out / "samples").glob("*.png"))) >= 2)
    second = _cli(args)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    [line] = lines(err)
    assert f"{out} is in use by another diffguide run" in line and f"pid {first.pid}" in line
    assert first.poll() is None, "the first run must still be working for the check to mean anything"
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert 2 <= len(pngs(out)) < 5000 and not temp_files(out)
    for png in (out / "samples").glob("*.png"):
        Image.open(png).load()
    # the holder is gone, so the folder is free again (a killed holder's flock goes with it)
    third = _cli([*args[:-2], "num_samples=4", f"out_dir={out}"])
    assert third.wait(timeout=120) == 0


# --- kills, Ctrl-C and a full disk --------------------------------------------------------------------------------

# Runs `python -m diffguide.run ARGS` with a signal sent at a chosen moment: `replace NAME K SIG` sends SIG to itself
# when the (K+1)-th file named NAME is about to be renamed into place (its temp file written, as a kill during that
# write would leave it); `score - 0 SIG` when scoring starts.
_AT = r"""
import os, runpy, signal, sys, time
moment, name, count, sig = sys.argv[1], sys.argv[2], int(sys.argv[3]), getattr(signal, sys.argv[4])
seen = [0]
if moment == "replace":
    real = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith(name):
            seen[0] += 1
            if seen[0] > count:
                os.kill(os.getpid(), sig); time.sleep(5)
        return real(src, dst, *a, **k)
    os.replace = replace
else:
    import diffguide.metrics.base as fidelity
    real_call = fidelity.FidelityMetric.__call__
    def call(self, *a, **k):
        os.kill(os.getpid(), sig); time.sleep(5)
        return real_call(self, *a, **k)
    fidelity.FidelityMetric.__call__ = call
sys.argv = ["diffguide.run", *sys.argv[5:]]
runpy.run_module("diffguide.run", run_name="__main__", alter_sys=True)
"""


def _run_at(moment, name, count, sig, args):
    return subprocess.run([sys.executable, "-c", _AT, moment, name, str(count), sig, *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, preexec_fn=interruptible)


@pytest.fixture
def scored_args(tiny_unet_path, tiny_evaluator_path, tmp_path):
    cache = tmp_path / "cache"
    return cache, [f"model.weights={tiny_unet_path}", f"metric.evaluator={tiny_evaluator_path}",
                   f"metric.cache_root={cache}", "metric.reference=test", "logger=none", "steps=3",
                   "num_samples=12", "batch_size=4"]


# one write in `make test`, the other three (the same promise at other writes, ~20 s each) in `make test-slow`
@pytest.mark.parametrize("name, count", [(".png", 5), pytest.param("metrics.json", 0, marks=pytest.mark.slow),
                                         pytest.param(".npz", 0, marks=pytest.mark.slow),
                                         pytest.param("grid.png", 0, marks=pytest.mark.slow)],
                         ids=["during a sample write", "during the metrics.json write", "during the cache write",
                              "during the grid write"])
def test_sigkill_at_any_write_then_resume_leaves_no_temp_file(scored_args, tmp_path, name, count):
    cache, args = scored_args
    out = tmp_path / "run"
    killed = _run_at("replace", name, count, "SIGKILL", [*args, f"out_dir={out}"])
    assert killed.returncode == -signal.SIGKILL
    assert temp_files(out, cache), "the kill should leave the temp file of the write it interrupted"

    resumed = subprocess.run([sys.executable, "-m", "diffguide.run", *args, f"out_dir={out}"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not temp_files(out, cache)
    result = json.loads((out / "metrics.json").read_text())
    assert len(pngs(out)) == 12 and result["num_samples"] == 12
    assert list(cache.glob("*.npz"))
    # metrics.json names every file the numbers rest on by digest: the model's and the evaluator's
    files = dict(a.split("=", 1) for a in args if a.startswith(("model.weights=", "metric.evaluator=")))
    assert result["files_sha256"] == {key: checkpoint.path_digest(path) for key, path in files.items()}


@pytest.mark.parametrize("moment", ["sampling", pytest.param("scoring", marks=pytest.mark.slow)])
def test_ctrl_c_is_one_line_and_exit_130_and_the_run_resumes(scored_args, tmp_path, moment):
    cache, args = scored_args
    out = tmp_path / "run"
    if moment == "sampling":
        interrupted = _run_at("replace", ".png", 5, "SIGINT", [*args, f"out_dir={out}"])
    else:
        interrupted = _run_at("score", "-", 0, "SIGINT", [*args, f"out_dir={out}"])
    kept = len(pngs(out))
    assert interrupted.returncode == 130
    assert lines(interrupted.stderr) == [f"interrupted: {kept} of 12 samples kept in {out / 'samples'}; "
                                         f"run the same command to resume"]
    assert kept == (5 if moment == "sampling" else 12)
    resumed = subprocess.run([sys.executable, "-m", "diffguide.run", *args, f"out_dir={out}"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["images_generated"] == 12 - kept
    assert not temp_files(out, cache)


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KB tmpfs (root only): room for the run's records and a few samples."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs to fill a disk")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_is_one_line_naming_the_folder_and_the_run_resumes(tiny_unet_path, small_disk):
    out = small_disk / "run"
    args = [f"model.weights={tiny_unet_path}", "metric=none", "logger=none", "steps=2", "num_samples=60",
            "batch_size=4", f"out_dir={out}"]
    full = subprocess.run([sys.executable, "-m", "diffguide.run", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 2
    [line] = lines(full.stderr)
    assert line.startswith(f"diffguide: error: no space left on the device of {out / 'samples'}") and "free" in line
    kept = pngs(out)
    assert 0 < len(kept) < 60 and not temp_files(out)
    assert "samples still to make need about" in line

    subprocess.run(["mount", "-o", "remount,size=2m", str(small_disk)], check=True)
    resumed = subprocess.run([sys.executable, "-m", "diffguide.run", *args], cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["images_generated"] == 60 - len(kept)
    assert {k: v for k, v in pngs(out).items() if k in kept} == kept
