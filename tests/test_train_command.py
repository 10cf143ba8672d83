"""`python -m diffguide.train` keeps the promises `python -m diffguide.run` keeps, met as a user meets them: in a
subprocess, every line of stderr counted. A resumed training ends bit-identical to an uninterrupted one; the
committed weights are never written without train.overwrite=true; every mistake is one line and exit 2 before any
step; a second training in the same folder is refused; Ctrl-C says where the checkpoint is."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from diffguide.store.lock import FolderLock
from diffguide.training import resume
from diffguide.training.recipes import train_unet
from tests.helpers import ROOT, SCHEDULE, TINY_UNET, interruptible, run_cli, toy_images

#: a network small enough that a step takes milliseconds: the tests time nothing, they read the log
TINY = ["train=fmnist_unet_weak", "train.unet.block_out_channels=[8,8,8]", "train.unet.norm_num_groups=4",
        "train.batch_size=4", "train.log_every=1", "device=cpu", "train.precision=fp32"]


def _env():
    return {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}


def _stopped_at(args: list[str], line_prefix: str, sig: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the command, send `sig` once stdout shows a line starting with `line_prefix`, and return what it printed
    (an observed event, not a timer)."""
    proc = subprocess.Popen([sys.executable, "-m", "diffguide.train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), preexec_fn=interruptible)
    seen = []
    for line in proc.stdout:
        seen.append(line.rstrip("\n"))
        if line.startswith(line_prefix):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=300)
    seen += out.splitlines()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "\n".join(seen), err), seen


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_identical(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]


def test_ctrl_c_is_one_line_and_the_same_command_resumes_bit_identical(tmp_path):
    """Ctrl-C at step 3 of 8: one line on stderr naming the step and the checkpoint, exit 130; the same command then
    resumes at step 3 and ends with weights equal, bit for bit, to an uninterrupted 8-step training's."""
    whole = run_cli("diffguide.train", *TINY, "train.steps=8", f"out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    args = [*TINY, "train.steps=8", f"out_dir={tmp_path / 'cut'}"]
    stopped, seen = _stopped_at(args, "step 3/8", signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    lines = stopped.stderr.splitlines()
    assert len(lines) == 1, stopped.stderr
    step = int(re.fullmatch(r"interrupted at step (\d+) of 8; checkpoint kept in (.+?); run the same command to "
                            r"resume", lines[0]).group(1))
    assert 3 <= step < 8 and not (tmp_path / "cut" / "fmnist_unet_weak.safetensors").exists()
    again = run_cli("diffguide.train", *args)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert f"resumed at step {step}/8" in again.stdout
    assert not any(line.startswith(f"step {k}/8") for k in range(1, step + 1) for line in again.stdout.splitlines())
    _assert_identical(tmp_path / "whole" / "fmnist_unet_weak.safetensors",
                      tmp_path / "cut" / "fmnist_unet_weak.safetensors")
    assert not list((tmp_path / "cut").glob("state-*.pt"))  # the state goes once the weights are written
    done = run_cli("diffguide.train", *args)  # a finished training is not trained again
    assert done.returncode == 0 and "already trained" in done.stdout and "step " not in done.stdout


@pytest.mark.slow  # make test-slow; scripts/fault_matrix.py --commands runs the same case
def test_a_kill_after_a_checkpoint_resumes_from_it(tmp_path):
    """SIGKILL (no handler runs) once step 4 is logged, with a checkpoint every 2 steps: the rerun resumes at 4."""
    args = [*TINY, "train.steps=6", "train.checkpoint_every=2", f"out_dir={tmp_path / 'k'}"]
    killed, _ = _stopped_at(args, "step 4/6", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    again = run_cli("diffguide.train", *args)
    assert again.returncode == 0, again.stderr
    assert "resumed at step 4/6" in again.stdout
    assert run_cli("diffguide.train", *TINY, "train.steps=6", f"out_dir={tmp_path / 'w'}").returncode == 0
    _assert_identical(tmp_path / "w" / "fmnist_unet_weak.safetensors", tmp_path / "k" / "fmnist_unet_weak.safetensors")


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True).stdout


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the project's git checkout")
def test_training_without_overwrite_leaves_git_status_clean():
    """The default writes under outputs/ (ignored); train.out=shipped without train.overwrite=true is refused in one
    line before any step, and the committed file keeps its bytes."""
    before = _git_status()
    shipped = ROOT / "diffguide" / "weights" / "fmnist_unet_weak.safetensors"
    committed = shipped.read_bytes()
    ran = run_cli("diffguide.train", *TINY, "train.steps=2")
    assert ran.returncode == 0, ran.stderr
    assert "outputs/train/fmnist_unet_weak-" in ran.stdout
    refused = run_cli("diffguide.train", *TINY, "train.steps=2", "train.out=shipped")
    assert refused.returncode == 2 and "step " not in refused.stdout
    assert refused.stderr.splitlines() == [f"diffguide: error: train.out: {shipped} exists; add train.overwrite=true "
                                           f"to replace it (it is replaced only when the training has ended)"]
    assert shipped.read_bytes() == committed
    assert _git_status() == before


def test_overwrite_replaces_the_file_only_when_training_ends(tmp_path):
    """With train.overwrite=true a kill mid-training leaves the old file whole; the finished run replaces it."""
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the old model")
    args = [*TINY, "train.steps=6", f"train.out={target}", "train.overwrite=true", f"out_dir={tmp_path / 'o'}"]
    killed, _ = _stopped_at(args, "step 2/6", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL and target.read_bytes() == b"the old model"
    done = run_cli("diffguide.train", *args)
    assert done.returncode == 0, done.stderr
    _assert_identical(target, tmp_path / "o" / "fmnist_unet_weak.safetensors")
    assert "steps: 6" in target.with_suffix(".md").read_text()


def test_a_second_training_in_a_held_folder_is_refused_in_one_line(tmp_path):
    folder = tmp_path / "busy"
    with FolderLock(folder, "diffguide training"):
        proc = run_cli("diffguide.train", *TINY, "train.steps=2", f"out_dir={folder}")
    assert proc.returncode == 2 and "step " not in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"diffguide: error: {folder} is in use by another diffguide "
                                                   f"training (host "), proc.stderr


@pytest.mark.slow  # make test-slow; scripts/fault_matrix.py --commands runs the same case
def test_a_folder_of_other_settings_is_refused(tmp_path):
    first = run_cli("diffguide.train", *TINY, "train.steps=2", f"out_dir={tmp_path / 'f'}")
    assert first.returncode == 0, first.stderr
    other = run_cli("diffguide.train", *TINY, "train.steps=3", f"out_dir={tmp_path / 'f'}")
    assert other.returncode == 2 and len(other.stderr.splitlines()) == 1
    assert "holds a training of other settings" in other.stderr and "step " not in other.stdout


@pytest.mark.parametrize("args,message", [
    (["train.stpes=5"], "train.stpes is not a key (did you mean steps?)"),
    (["train=bogus"], "train=bogus is not an option; choose one of: fmnist_dit, "),
    (["train.steps=abc"], "train.steps='abc': use a whole number >= 1"),
    pytest.param(["train.batch_size=0"], "train.batch_size=0: use a whole number >= 1", marks=pytest.mark.slow),
    (["--foo"], "--foo is not an option (usage: python -m diffguide.train"),
    (["--experimental-rerun", "x.pickle"], "--experimental-rerun is not an option"),
    pytest.param(["train.out=/proc/x.safetensors"], "train.out=/proc/x.safetensors: its folder /proc cannot be "
                 "written", marks=pytest.mark.slow),
    pytest.param(["train.out=/"], "train.out=/: / is a folder; name a file", marks=pytest.mark.slow),
    pytest.param(["out_dir=/proc/x"], "out_dir=/proc/x cannot be used as the output folder", marks=pytest.mark.slow),
    (["train.overwrite=maybe"], "train.overwrite='maybe': use true or false"),
    pytest.param(["device=tpu"], "device='tpu' is not a device", marks=pytest.mark.slow),
])
def test_every_mistake_is_one_line_and_exit_2_before_any_step(tmp_path, args, message):
    proc = run_cli("diffguide.train", *TINY, "train.steps=2", f"out_dir={tmp_path / 'm'}", *args)
    assert proc.returncode == 2 and "step " not in proc.stdout, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"diffguide: error: {message}"), proc.stderr


def _cfg(tmp_path, steps):
    return OmegaConf.create(dict(seed=1, steps=steps, batch_size=8, lr=3e-3, warmup_steps=1, weight_decay=0.01,
                                 ema_decay=0.9, label_dropout=0.2, log_every=1, precision="fp32",
                                 out=str(tmp_path / "u.safetensors"), num_classes=4))


def _train(tmp_path, folder, stop_after=None):
    """train_unet under a TrainingState in `folder`; with `stop_after`, SIGINT this process when that step is
    logged (the loop defers it to the step's end, saves, and raises Interrupted)."""
    torch.manual_seed(0)
    from diffguide.models import unet as unet_lib

    model = unet_lib.build(TINY_UNET, 4, SCHEDULE)
    images, labels = toy_images()

    def log(line):
        if stop_after is not None and line.startswith(f"step {stop_after}/"):
            os.kill(os.getpid(), signal.SIGINT)

    with resume.active(resume.TrainingState(folder, every=0)):
        return train_unet(_cfg(tmp_path, 5), images, labels, torch.device("cpu"), log=log, model=model)


def test_the_loop_resumes_the_fp32_weights_and_the_ema_bit_for_bit(tmp_path):
    """In fp32, before the fp16 storage of the weights file: the live parameters, the EMA the model is returned as,
    and the stats of a training interrupted at step 2 of 5 and resumed equal an uninterrupted run's."""
    whole, whole_stats = _train(tmp_path, tmp_path / "a")
    with pytest.raises(resume.Interrupted, match=r"interrupted at step 2 of 5; checkpoint kept in "):
        _train(tmp_path, tmp_path / "b", stop_after=2)
    resumed, resumed_stats = _train(tmp_path, tmp_path / "b")
    for (k, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert {k: v for k, v in whole_stats.items() if k != "wall_time_s"} == \
        {k: v for k, v in resumed_stats.items() if k != "wall_time_s"}
    state = torch.load(tmp_path / "b" / "state-0.pt", weights_only=True)  # kept: nothing here clears it
    assert state["step"] == 5 and state["optimizer"]["state"]


def test_progressive_distillation_writes_every_round_and_its_card(tmp_path):
    """A recipe that makes one file per round: each lands in the folder and at train.out's prefix, with its card
    (the round's own stats)."""
    proc = run_cli("diffguide.train", "train=fmnist_progressive", "train.rounds=[2,1]", "train.steps=2",
                   "train.batch_size=2", "train.log_every=1", "device=cpu", f"out_dir={tmp_path / 'p'}",
                   f"train.out={tmp_path / 'mine'}")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    for steps in (2, 1):
        for place in (tmp_path / "p" / f"fmnist_guided_student_{steps}step", tmp_path / f"mine_{steps}step"):
            assert place.with_suffix(".safetensors").is_file()
            card = place.with_suffix(".md").read_text()
            assert f'"student_steps": {steps}' in card and "rounds:\n- 2\n- 1" in card
