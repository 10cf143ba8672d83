"""`python -m diffguide.run`'s promises at the folder's edge, met in a subprocess as a user meets them: a refused run
changes nothing in the folder it was refused; Hydra's pickle-loading flag is refused; a run killed midway still
counts in the totals of the run that resumes it; a Ctrl-C in a folder named by the clock says how to resume it."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from diffguide.store.lock import FolderLock
from tests.helpers import ROOT, interruptible, run_cli

SMALL = ["steps=2", "num_samples=4", "batch_size=2", "metric=none", "logger=none", "device=cpu"]


def _snapshot(folder):
    """Every file's bytes but the lock's (its content names the newest holder)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".diffguide.lock"}


def test_a_run_refused_for_other_settings_changes_nothing_in_the_folder(tmp_path):
    """The second run (other steps) exits 2 in one line; .hydra/, failed.json and everything else are as the first
    run left them (before, Hydra rewrote .hydra/ to name the refused settings, and a failed.json appeared)."""
    folder = tmp_path / "run"
    first = run_cli("diffguide.run", *SMALL, f"out_dir={folder}")
    assert first.returncode == 0, first.stderr
    before = _snapshot(folder)
    assert ".hydra/overrides.yaml" in before and "failed.json" not in before
    second = run_cli("diffguide.run", *SMALL, "steps=3", f"out_dir={folder}")
    assert second.returncode == 2
    assert len(second.stderr.splitlines()) == 1 and "holds samples made with other settings" in second.stderr
    assert _snapshot(folder) == before


@pytest.mark.slow  # make test-slow; scripts/fault_matrix.py --commands runs the same case
def test_a_run_refused_for_a_held_folder_changes_nothing_in_it(tmp_path):
    folder = tmp_path / "run"
    assert run_cli("diffguide.run", *SMALL, f"out_dir={folder}").returncode == 0
    before = _snapshot(folder)
    with FolderLock(folder):
        second = run_cli("diffguide.run", *SMALL, f"out_dir={folder}")
    assert second.returncode == 2 and len(second.stderr.splitlines()) == 1
    assert "is in use by another diffguide run" in second.stderr
    assert _snapshot(folder) == before


class _Planted:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_hydra_rerun_of_a_pickle_is_refused_in_one_line(tmp_path):
    planted = tmp_path / "config.pickle"
    planted.write_bytes(pickle.dumps(_Planted(tmp_path / "pwned")))
    proc = run_cli("diffguide.run", "--experimental-rerun", str(planted))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["diffguide: error: --experimental-rerun is refused: it loads a pickle, which "
                                        "can run any code; rerun a point with its own overrides (its folder's "
                                        ".hydra/overrides.yaml)"]
    assert not (tmp_path / "pwned").exists()


def _attempts(folder):
    try:
        return json.loads((folder / "attempts.json").read_text())
    except (OSError, ValueError):
        return {}


def test_totals_count_the_attempt_a_kill_cut_short(tmp_path):
    """SIGKILL once the first attempt has recorded two images (attempts.json, rewritten after every batch): the
    resumed run's images_generated_total and sampling_wall_s_total add that attempt's images and seconds to its
    own."""
    folder = tmp_path / "run"
    args = ["steps=4", "num_samples=40", "batch_size=2", "metric=none", "logger=none", "device=cpu",
            f"out_dir={folder}"]
    proc = subprocess.Popen([sys.executable, "-m", "diffguide.run", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "disabled"},
                            preexec_fn=interruptible)
    while proc.poll() is None and not any(e["images"] >= 2 for e in _attempts(folder).values()):
        time.sleep(0.05)  # polling for the event (the file's content), not a timed guess
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    [killed] = _attempts(folder).values()
    assert killed["images"] >= 2
    resumed = run_cli("diffguide.run", *args)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["images_generated_total"] == killed["images"] + metrics["images_generated"]
    assert metrics["sampling_wall_s_total"] >= killed["seconds"] + metrics["sampling_wall_s"] - 2e-3
    assert len(_attempts(folder)) == 2


def test_ctrl_c_in_a_folder_named_by_the_clock_says_which_out_dir_resumes(tmp_path):
    """Without out_dir= the same command would make a new folder: the line names the out_dir that resumes."""
    proc = subprocess.Popen([sys.executable, "-m", "diffguide.run", "steps=4", "num_samples=40", "batch_size=2",
                             "metric=none", "logger=none", "device=cpu",
                             f"hydra.run.dir={tmp_path / 'clock'}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "disabled"},
                            preexec_fn=interruptible)
    while proc.poll() is None and not _attempts(tmp_path / "clock"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    [line] = err.splitlines()
    assert line.startswith("interrupted: ") and line.endswith(f"add out_dir={tmp_path / 'clock'} to the same command "
                                                              f"to resume")
