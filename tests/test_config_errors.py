"""Every mistake a user can make on the command line: one clear line, a non-zero exit, nothing sampled."""

import pytest

from tests.conftest import run_cli

CASES = [
    (["steps=-5"], "steps must be >= 1"),
    (["num_samples=0"], "num_samples must be >= 1"),
    (["scale=nan"], "scale must be a finite number"),
    (["steps=abc"], "could not be converted to Integer"),
    (["precision=fp64"], "Invalid value 'fp64'"),
    (["guidance=nonexistent"], "Could not find 'guidance/nonexistent'"),
    (["scael=2"], "scael"),
    (["model.weights=/nowhere/unet.safetensors"], "weights file not found: /nowhere/unet.safetensors"),
    (["metric.evaluator=/nowhere/e.safetensors"], "weights file not found: /nowhere/e.safetensors"),
    (["device=cuda:3"], "no CUDA GPU"),
    (["sampler.spacing=sideways"], "spacing 'sideways'"),
    (["steps=5000"], "exceeds the model's 1000 training timesteps"),
    (["model=gmm", "guidance=classifier", "metric=none"], "gmm_exact for guidance=classifier"),
    (["guidance=gfcg", "guidance.base=sideways"], "base 'sideways'"),
    (["guidance=universal", "guidance.recurrence=0"], "recurrence must be a whole number >= 1"),
    (["model=ddpm_cifar10", "model.source=/nowhere/ddpm", "metric=none"], "model.source=/nowhere/ddpm: no such folder"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_user_error_is_one_clear_line(tmp_path, args, message):
    proc = run_cli("diffguide.run", *args, "logger=none", f"out_dir={tmp_path / 'out'}", timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    if "diffguide: error:" in proc.stderr:
        assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    assert not (tmp_path / "out" / "samples").exists()


def test_missing_dataset_names_both_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFGUIDE_FMNIST_DIR", str(tmp_path / "empty"))
    proc = run_cli("diffguide.run", "logger=none", f"out_dir={tmp_path / 'out'}")
    assert proc.returncode != 0
    [line] = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Fashion-MNIST not found" in line and "apt-get install dataset-fashion-mnist" in line
    assert "python -m diffguide.data.fashion_mnist --download" in line


def test_sweep_job_folder_names():
    from diffguide.config import job_dirname

    assert job_dirname(["scale=2", "guidance=cfg", "model.weights=/a/b.safetensors", "num_samples=50"],
                       ["model.weights", "num_samples"]) == "guidance=cfg,scale=2"
    assert job_dirname(["classifier.path=/x/y"], []) == "classifier.path=_x_y"
    assert job_dirname([], []) == "defaults"
