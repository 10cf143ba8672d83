"""`python -m diffguide.classify` and `python -m diffguide.edit` keep each batch's results as they are made: a
Ctrl-C is one line saying how many images are kept and how to resume, the rerun keeps them and does the rest, and
its results equal an uninterrupted run's; the folder is held by one process at a time, and parts of other settings
are refused. Each case runs as a user runs it: a subprocess, every stderr line counted."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from diffguide.store.lock import FolderLock
from tests.helpers import ROOT, interruptible, run_cli

CLASSIFY = ["model=fmnist_unet", "num_images=40", "n_samples=[4]", "to_keep=[1]", "batch_size=2", "device=cpu",
            "precision=fp32"]
EDIT = ["images=[0,1,2,3,4,5,6,7,8,9,10,11]", "steps=40", "batch_size=2", "edit.target=3", "device=cpu"]
CASES = {"classify": (CLASSIFY, "classify.json", "classified"), "edit": (EDIT, "edit.json", "inverted")}


def _interrupted(module: str, args: list[str], folder) -> subprocess.CompletedProcess:
    """SIGINT once the first batch's part is on disk (an observed event, polled), then what the command said."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "disabled"},
                            preexec_fn=interruptible)
    while proc.poll() is None and not list((folder / "parts").glob("*.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _result(path):
    result = json.loads(path.read_text())
    for key in ("wall_s", "images_per_s", "settings"):  # seconds differ; settings name the folder
        result.pop(key, None)
    return result


@pytest.mark.parametrize("command", ["classify", pytest.param("edit", marks=pytest.mark.slow)])
def test_ctrl_c_keeps_every_finished_batch_and_the_rerun_does_the_rest(tmp_path, command):
    args, result_file, verb = CASES[command]
    whole = run_cli(f"diffguide.{command}", *args, f"out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    folder = tmp_path / "cut"
    stopped = _interrupted(f"diffguide.{command}", [*args, f"out_dir={folder}"], folder)
    assert stopped.returncode == 130, stopped.stderr
    [line] = stopped.stderr.splitlines()
    total = 40 if command == "classify" else 12
    kept = int(re.fullmatch(rf"interrupted: (\d+) of {total} images {verb} and kept in {folder / 'parts'}; run "
                            rf"the same command to resume", line).group(1))
    assert 2 <= kept < total and not (folder / result_file).exists()
    again = run_cli(f"diffguide.{command}", *args, f"out_dir={folder}")
    assert again.returncode == 0, again.stderr
    assert again.stderr.splitlines() == [f"diffguide: resuming: {kept // 2} batch(es) of "
                                         f"{'predictions' if command == 'classify' else 'inversions'} kept in "
                                         f"{folder / 'parts'}"]
    assert _result(folder / result_file) == _result(tmp_path / "whole" / result_file)


@pytest.mark.parametrize("command", ["classify", pytest.param("edit", marks=pytest.mark.slow)])
def test_a_held_folder_is_refused_in_one_line(tmp_path, command):
    args, result_file, _ = CASES[command]
    folder = tmp_path / "busy"
    with FolderLock(folder):
        proc = run_cli(f"diffguide.{command}", *args, f"out_dir={folder}")
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"diffguide: error: {folder} is in use by another diffguide {command} (host ")
    assert not (folder / result_file).exists()


@pytest.mark.slow  # make test-slow; scripts/fault_matrix.py --commands runs the same case
def test_parts_of_other_settings_are_refused(tmp_path):
    folder = tmp_path / "c"
    stopped = _interrupted("diffguide.classify", [*CLASSIFY, f"out_dir={folder}"], folder)
    assert stopped.returncode == 130
    other = run_cli("diffguide.classify", *CLASSIFY, "seed=1", f"out_dir={folder}")
    assert other.returncode == 2
    [line] = other.stderr.splitlines()
    assert "batch(es) of results made with other settings (settings.seed: 0 there, 1 now)" in line


def test_edit_warns_in_one_line_when_the_steps_are_too_few_for_inversion(tmp_path):
    """Measured on the embedded model (diffguide/edit.py MIN_STEPS): below 40 steps the reconstruction falls under
    25 dB PSNR; the run goes on, with one warning line."""
    proc = run_cli("diffguide.edit", "images=[0,1]", "steps=20", "device=cpu", f"out_dir={tmp_path / 'e'}")
    assert proc.returncode == 0
    [line] = proc.stderr.splitlines()
    assert line.startswith("diffguide: warning: steps=20 is too few for inversion to hold")
    assert json.loads(proc.stdout.splitlines()[-1])["psnr"] < 25
