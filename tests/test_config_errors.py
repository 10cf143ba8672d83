"""Every mistake a user can make on the command line: one line on stderr, whoever would have printed it (Hydra, a
traceback, a warning, a progress bar), a non-zero exit, and nothing sampled.

Each case (tests/cli_mistakes.py, the list scripts/fault_matrix.py audits too) runs as its own `python -m diffguide.run`
process, as a user types it; the cases of `make test` run two at a time (one module-scoped fixture) and each
parametrized test reads its own result; a slow case runs in its own test. "Before any work" is judged by what the
process left behind, never by the clock: no sample and no sampling.json (a run claims its folder only once the model,
sampler, guidance and metric are built and checked)."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cli_mistakes import MISTAKES, Mistake
from tests.helpers import ROOT

WEIGHTS = ROOT / "diffguide" / "weights"

# (id, args, a phrase the line must hold, exit status, extra environment). OUT stands for the case's own out_dir.


def _run(args, env_extra, tmp: Path):
    out = tmp / "out"
    args = [a.replace("OUT", str(out)) for a in args]
    if not any(a.startswith("out_dir=") for a in args):
        args.append(f"out_dir={out}")
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    for key, value in env_extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value.replace("{tmp}", str(tmp))
    # a small run, should a case not stop: the case's own arguments come last and win
    small = ["logger=none", "steps=5", "batch_size=4", "num_samples=24"]
    proc = subprocess.run([sys.executable, "-m", "diffguide.run", *small, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    return proc, out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The results of every case of `make test`, run two at a time."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {m.name: pool.submit(_run, m.args, m.env, tmp_path_factory.mktemp("case"))
                   for m in MISTAKES if not m.slow}
        return {name: f.result() for name, f in futures.items()}


def stderr_lines(text: str) -> list[str]:
    """Every non-empty line of stderr, a progress bar's carriage-return updates counted as lines too."""
    return [line for line in text.replace("\r", "\n").split("\n") if line.strip()]


@pytest.mark.parametrize("mistake", [pytest.param(m, marks=[pytest.mark.slow] if m.slow else []) for m in MISTAKES],
                         ids=[m.name for m in MISTAKES])
def test_user_error_is_one_line_before_any_work(request, tmp_path, mistake: Mistake):
    if mistake.slow:
        proc, out = _run(mistake.args, mistake.env, tmp_path)
    else:
        proc, out = request.getfixturevalue("results")[mistake.name]
    lines = stderr_lines(proc.stderr)
    assert proc.returncode == mistake.status if mistake.status is not None else proc.returncode != 0, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("diffguide: error: "), lines[0]
    assert mistake.phrase is None or mistake.phrase in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not list(out.glob("**/*.png")), "nothing may be sampled"
    assert not list(out.glob("**/sampling.json")), "the run folder may not be claimed: the refusal comes first"


def test_a_sweep_names_each_bad_point_and_runs_none(tmp_path):
    proc, out = _run(["-m", "guidance=cfg,bogus,nope", "scale=1,2"], {}, tmp_path)
    lines = stderr_lines(proc.stderr)
    assert proc.returncode == 2
    assert len(lines) == 4 and all(line.startswith("diffguide: error: guidance=") for line in lines), proc.stderr
    assert sum("guidance=bogus is not an option" in line for line in lines) == 2
    assert not out.exists() or not list(out.iterdir()), "no point may run when one is bad"


def test_missing_dataset_names_both_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFGUIDE_FMNIST_DIR", str(tmp_path / "empty"))
    proc, _ = _run([], {}, tmp_path)
    assert proc.returncode == 2
    [line] = stderr_lines(proc.stderr)
    assert "Fashion-MNIST not found" in line and "apt-get install dataset-fashion-mnist" in line
    assert "python -m diffguide.data.fashion_mnist --download" in line


def test_sweep_job_folder_names():
    from diffguide.command.config import job_dirname

    assert job_dirname(["scale=2", "guidance=cfg", "model.weights=/a/b.safetensors", "num_samples=50"],
                       ["model.weights", "num_samples"]) == "guidance=cfg,scale=2"
    assert job_dirname(["classifier.path=/x/y"], []) == "classifier.path=_x_y"
    assert job_dirname([], []) == "defaults"
    # `group.*` leaves out every key of a group (the metric's settings do not change the images)
    assert job_dirname(["scale=2", "metric.isc_splits=1", "metric=none", "metricx=1"], ["metric", "metric.*"]) \
        == "metricx=1,scale=2"
