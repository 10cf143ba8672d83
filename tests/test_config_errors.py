"""Every mistake a user can make on the command line: one line on stderr, whoever would have printed it (Hydra, a
traceback, a warning, a progress bar), a non-zero exit, and nothing sampled.

Each case runs as its own `python -m diffguide.run` process, as a user types it; the cases run two at a time (one
module-scoped fixture) and each parametrized test reads its own result."""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import ROOT

WEIGHTS = ROOT / "diffguide" / "weights"

# (id, args, a phrase the line must hold, exit status, extra environment). OUT stands for the case's own out_dir.
CASES = [
    ("group option", ["guidance=bogus"], "guidance=bogus is not an option", 2, {}),
    ("schedule kind", ["guidance.schedule=rising"], "schedule kind 'rising' is not one of constant, linear", 2, {}),
    ("dynamic threshold", ["sampler.dynamic_threshold=2"], "sampler.dynamic_threshold must be a fraction", 2, {}),
    ("perturbation on the mixture", ["model=gmm", "guidance=pag", "metric=none"],
     "model=gmm is an exact Gaussian mixture with no network", 2, {}),
    ("perturbed block out of range", ["guidance=pag", "guidance.blocks=[5]"], "block 5 is out of range", 2, {}),
    ("diffusion classifier pairs", ["guidance=offshelf", "classifier=fmnist_diffusion", "classifier.n_pairs=0"],
     "classifier.n_pairs=0: use a whole number >= 1", 2, {}),
    ("diffusion classifier on a flow model", ["model=fmnist_flow", "guidance=offshelf", "classifier=fmnist_diffusion"],
     "the Diffusion Classifier needs a discrete-time model", 2, {}),
    ("ppap experts missing", ["guidance=classifier", "classifier=fmnist_ppap", "classifier.weights=/nope.safetensors"],
     "no such file (train it with", 2, {}),
    ("group option lists choices", ["sampler=ddmi"], "choose one of: ddim, ddpm, dpmpp_2m", 2, {}),
    ("launcher option", ["hydra/launcher=bogus"], "hydra/launcher=bogus is not an option", 2, {}),
    ("unknown key", ["foo=1"], "foo is not a key", 2, {}),
    ("key typo", ["stpes=5"], "stpes is not a key (did you mean steps?)", 2, {}),
    ("nested key typo", ["guidance.scael=2"], "guidance.scael is not a key (did you mean scale?)", 2, {}),
    ("key of another sampler", ["sampler=ddpm", "sampler.eta=nan"], "sampler.eta is not a key", 2, {}),
    ("appended key", ["+guidance.bogus=1"], "guidance.bogus is not a key of CFG", 2, {}),
    ("enum value", ["precision=fp8"], "expected one of [fp32, bf16, fp16]", 2, {}),
    ("bool key", ["sampler.clip_x0=maybe"], "sampler.clip_x0='maybe': expected true or false", 2, {}),
    ("float key", ["guidance=cfg_interval", "guidance.sigma_hi=abc"], "guidance.sigma_hi='abc': expected a number",
     2, {}),
    ("empty int", ["steps="], "steps:", 2, {}),
    ("empty float", ["scale="], "scale:", 2, {}),
    ("not an int", ["steps=abc"], "could not be converted to Integer", 2, {}),
    ("override syntax", ["scale=1,"], "cannot parse the overrides", 2, {}),
    ("negative steps", ["steps=-5"], "steps must be >= 1", 2, {}),
    ("no samples", ["num_samples=0"], "num_samples must be >= 1", 2, {}),
    ("nan scale", ["scale=nan"], "scale must be a finite number", 2, {}),
    ("seed past 2^64", ["seed=18446744073709551615"], "seed + num_samples - 1 must be <=", 2, {}),
    ("mps", ["device=mps"], "no mps device", 2, {}),
    ("cuda", ["device=cuda:3"], "no CUDA GPU", 2, {}),
    ("out_dir is a file", ["out_dir=" + str(ROOT / "README.md")], "it is a file, not a folder", 2, {}),
    ("out_dir under /proc", ["out_dir=/proc/diffguide-test"], "cannot be used as the output folder", 2, {}),
    ("missing weights", ["model.weights=/nowhere/unet.safetensors"], "weights file not found", 2, {}),
    ("weights not safetensors", [f"model.weights={ROOT / 'README.md'}"], "not a whole safetensors file", 2, {}),
    ("missing weak model", ["guidance=autoguidance", "guidance.weak_model.weights=/nowhere/weak.safetensors"],
     "weights file not found: /nowhere/weak.safetensors", 2, {}),
    ("missing evaluator", ["metric.evaluator=/nowhere/e.safetensors"], "weights file not found", 2, {}),
    ("reference name", ["metric.reference=bogus"], "use train, test, or the path of an .npz", 2, {}),
    ("too few samples for the metric", ["num_samples=3"], "metric.prc needs more than 3 samples", 2, {}),
    ("metric batch size", ["metric.batch_size=0"], "metric.batch_size", 2, {}),
    ("kid subset size", ["metric.kid_subset_size=1"], "metric.kid_subset_size", 2, {}),
    ("bootstrap replicates", ["metric.bootstrap=-1"], "metric.bootstrap=-1: use an integer >= 0 (0: no intervals)",
     2, {}),
    ("fid_inf flag", ["metric.fid_inf=maybe"], "metric.fid_inf='maybe': use true or false", 2, {}),
    ("class-accuracy floor", ["tune.min_class_accuracy=high"], "tune.min_class_accuracy", 2, {}),
    ("search space", ["-m", "hydra/sweeper=tune", "scale=interval(1,nan)"], "scale=nan: scale must be a finite",
     2, {}),
    ("cfg on a distilled student", ["model=fmnist_guided_student", "guidance=cfg"],
     "guidance=cfg does not apply to a guidance-distilled student", 2, {}),
    ("distilled on a plain model", ["guidance=distilled"], "guidance=distilled needs a guidance-distilled student",
     2, {}),
    ("progressive student at other steps", ["model=fmnist_guided_student_8step"], "run it with steps=8", 2, {}),
    ("scale outside a student's range", ["model=fmnist_guided_student", "scale=6"],
     "scale=6 is outside the scales this student was trained on", 2, {}),
    ("lora student without its teacher", ["model=fmnist_guided_student_lora", "model.teacher=/nowhere/t.safetensors"],
     "model.teacher: weights file not found: /nowhere/t.safetensors", 2, {}),
    ("lora student on another teacher", ["model=fmnist_guided_student_lora",
                                          f"model.teacher={WEIGHTS / 'fmnist_unet_weak.safetensors'}"],
     "is not the teacher this LoRA student was trained on", 2, {}),
    ("sampler spacing", ["sampler.spacing=sideways"], "spacing 'sideways'", 2, {}),
    ("too many steps", ["steps=5000"], "exceeds the model's 1000 training timesteps", 2, {}),
    ("classifier of another model", ["model=gmm", "guidance=classifier", "metric=none"],
     "gmm_exact for guidance=classifier", 2, {}),
    ("gfcg base", ["guidance=gfcg", "guidance.base=sideways"], "base 'sideways'", 2, {}),
    ("universal recurrence", ["guidance=universal", "guidance.recurrence=0"], "recurrence must be a whole number", 2,
     {}),
    ("hub folder", ["model=ddpm_cifar10", "model.source=/nowhere/ddpm", "metric=none"],
     "model.source=/nowhere/ddpm: no such folder", 2, {}),
    # no network and no HF_HUB_OFFLINE: the hub is found unreachable in seconds, not after a minute of retries
    ("hub unreachable", ["model=ddpm_cifar10", "model.source=someone/ddpm", "metric=none"],
     "could not be reached", 2, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
                                 "HF_HOME": "{tmp}/hf"}),
    ("sweep: one bad point", ["-m", "scale=1,nan"], "scale=nan: scale must be a finite number", 2, {}),
]


def _run(case_id, args, env_extra, tmp: Path):
    out = tmp / "out"
    args = [a.replace("OUT", str(out)) for a in args]
    if not any(a.startswith("out_dir=") for a in args):
        args.append(f"out_dir={out}")
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0",
           **{k: v.replace("{tmp}", str(tmp)) for k, v in env_extra.items()}}
    start = time.monotonic()
    # a small run, should a case not stop: the case's own arguments come last and win
    small = ["logger=none", "steps=5", "batch_size=4", "num_samples=24"]
    proc = subprocess.run([sys.executable, "-m", "diffguide.run", *small, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    return proc, time.monotonic() - start, out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case[0]: pool.submit(_run, case[0], case[1], case[4], tmp_path_factory.mktemp("case"))
                   for case in CASES}
        return {case_id: f.result() for case_id, f in futures.items()}


def stderr_lines(text: str) -> list[str]:
    """Every non-empty line of stderr, a progress bar's carriage-return updates counted as lines too."""
    return [line for line in text.replace("\r", "\n").split("\n") if line.strip()]


@pytest.mark.parametrize("case_id, args, phrase, status, env", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_before_any_work(results, case_id, args, phrase, status, env):
    proc, seconds, out = results[case_id]
    lines = stderr_lines(proc.stderr)
    assert proc.returncode == status, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("diffguide: error: ") and phrase in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not list(out.glob("**/*.png")), "nothing may be sampled"
    assert seconds < 60, f"{case_id} took {seconds:.0f} s"


def test_a_sweep_names_each_bad_point_and_runs_none(tmp_path):
    proc, _, out = _run("sweep", ["-m", "guidance=cfg,bogus,nope", "scale=1,2"], {}, tmp_path)
    lines = stderr_lines(proc.stderr)
    assert proc.returncode == 2
    assert len(lines) == 4 and all(line.startswith("diffguide: error: guidance=") for line in lines), proc.stderr
    assert sum("guidance=bogus is not an option" in line for line in lines) == 2
    assert not out.exists() or not list(out.iterdir()), "no point may run when one is bad"


def test_missing_dataset_names_both_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFGUIDE_FMNIST_DIR", str(tmp_path / "empty"))
    proc, _, _ = _run("dataset", [], {}, tmp_path)
    assert proc.returncode == 2
    [line] = stderr_lines(proc.stderr)
    assert "Fashion-MNIST not found" in line and "apt-get install dataset-fashion-mnist" in line
    assert "python -m diffguide.data.fashion_mnist --download" in line


def test_sweep_job_folder_names():
    from diffguide.config import job_dirname

    assert job_dirname(["scale=2", "guidance=cfg", "model.weights=/a/b.safetensors", "num_samples=50"],
                       ["model.weights", "num_samples"]) == "guidance=cfg,scale=2"
    assert job_dirname(["classifier.path=/x/y"], []) == "classifier.path=_x_y"
    assert job_dirname([], []) == "defaults"
    # `group.*` leaves out every key of a group (the metric's settings do not change the images)
    assert job_dirname(["scale=2", "metric.isc_splits=1", "metric=none", "metricx=1"], ["metric", "metric.*"]) \
        == "metricx=1,scale=2"
