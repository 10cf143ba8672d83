"""A run killed with SIGKILL in the middle of sampling, started again with the same command, writes only the missing
samples, leaves no partial PNG, and ends with the same images and the same metrics as a run never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, run_cli


@pytest.mark.slow  # make test-slow: the suite's time (the same promise as its siblings in make test)
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tiny_unet_path, tiny_evaluator_path,
                                                                  fidelity_cache, tmp_path):
    args = ["guidance=cfg", "scale=2.0", f"model.weights={tiny_unet_path}", f"metric.evaluator={tiny_evaluator_path}",
            f"metric.cache_root={fidelity_cache}", "logger=none", "steps=40", "num_samples=24", "batch_size=4"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffguide.run", *args, f"out_dir={killed}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((killed / "samples").glob("*.png"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name for p in (killed / "samples").glob("*.png")}
    assert 4 <= len(before) < 24 and not (killed / "metrics.json").exists()

    resumed = run_cli("diffguide.run", *args, f"out_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads((killed / "metrics.json").read_text())
    assert result["images_generated"] == 24 - len(before)
    assert not list((killed / "samples").glob(".*"))  # no temp file of the killed write is left

    assert run_cli("diffguide.run", *args, f"out_dir={whole}").returncode == 0
    reference = json.loads((whole / "metrics.json").read_text())
    for i in range(24):
        name = f"{i:06d}.png"
        assert (killed / "samples" / name).read_bytes() == (whole / "samples" / name).read_bytes(), name
    # same images, so the same scores (to float noise from torch-fidelity's cached reference statistics)
    for key in ("fid_fmnist", "isc_fmnist", "precision_fmnist", "recall_fmnist", "class_accuracy", "nfe"):
        assert result[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-9), key
