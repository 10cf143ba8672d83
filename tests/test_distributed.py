"""`torchrun --nproc_per_node=2 -m diffguide.run` on the CPU (gloo): the two shards together are byte for byte the
images of a one-process run, and the run is scored once, by rank 0, with the same numbers."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, run_cli


@pytest.mark.slow  # make test-slow: the suite's time (the same promise as its siblings in make test)
def test_two_ranks_write_the_same_images_as_one(tiny_unet_path, tiny_evaluator_path, fidelity_cache, tmp_path):
    args = ["guidance=cfg", "scale=2.0", f"model.weights={tiny_unet_path}", f"metric.evaluator={tiny_evaluator_path}",
            f"metric.cache_root={fidelity_cache}", "logger=none", "steps=3", "num_samples=10", "batch_size=3"]
    two, one = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                           "-m", "diffguide.run", *args, f"out_dir={two}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_cli("diffguide.run", *args, f"out_dir={one}").returncode == 0

    sharded, single = json.loads((two / "metrics.json").read_text()), json.loads((one / "metrics.json").read_text())
    assert sharded["processes"] == 2 and sharded["images_generated"] == 10
    for i in range(10):
        name = f"{i:06d}.png"
        assert (two / "samples" / name).read_bytes() == (one / "samples" / name).read_bytes(), name
    # same images, so the same scores (to float noise: one run may compute the reference statistics that the other
    # reads back from torch-fidelity's cache)
    for key in ("fid_fmnist", "isc_fmnist", "class_accuracy", "nfe"):
        assert sharded[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
    assert (two / "labels.csv").read_text() == (one / "labels.csv").read_text()


def test_a_multi_process_run_needs_an_explicit_out_dir(tiny_unet_path, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
                           "-m", "diffguide.run", f"model.weights={tiny_unet_path}", "metric=none", "logger=none"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs out_dir=" in proc.stderr
