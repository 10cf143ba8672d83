"""A sweep through `hydra/launcher=slurm` on a real Slurm cluster: the single-node one that
scripts/slurm_local.sh starts on this machine (CI starts it before the tests). Skipped, with the reason, only where
no Slurm controller answers."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import run_cli


def slurm_ready() -> str | None:
    """None when a Slurm node is up, else why not."""
    if shutil.which("sinfo") is None:
        return "Slurm is not installed (sudo scripts/slurm_local.sh install && sudo scripts/slurm_local.sh start)"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or not any(s.strip("*~#") in ("idle", "mixed", "allocated") for s in proc.stdout.split()):
        return f"no Slurm node is up (sudo scripts/slurm_local.sh start): {proc.stderr.strip()[:200]}"
    return None


NOT_READY = slurm_ready()


@pytest.mark.skipif(NOT_READY is not None, reason=str(NOT_READY))
def test_a_sweep_runs_as_slurm_array_jobs(tiny_unet_path, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("diffguide.run", "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0",
                   "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10",
                   "guidance=cfg,none", "scale=2.0", f"model.weights={tiny_unet_path}", "metric=none", "logger=none",
                   "steps=2", "num_samples=3", f"out_dir={sweep}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {json.loads(p.read_text())["guidance"]: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert sorted(results) == ["cfg", "none"]
    assert results["cfg"]["nfe"] == 4 and results["none"]["nfe"] == 2
    # Each point ran as a task of one Slurm array job: submitit keeps a log folder per task, named by its job id.
    logs = sorted(p.name for p in (sweep / ".submitit").glob("*_*") if p.is_dir())
    assert len(logs) == 2 and len({name.split("_")[0] for name in logs}) == 1


@pytest.mark.skipif(NOT_READY is not None, reason=str(NOT_READY))
def test_a_slurm_job_with_two_tasks_shards_one_run(tiny_unet_path, tmp_path):
    """`srun` with two tasks: each task is a rank (submitit supplies torch's variables), and the union of the shards
    is the one-process run's images, byte for byte."""
    args = f"model.weights={tiny_unet_path} metric=none logger=none steps=2 num_samples=6 batch_size=2"
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --output={tmp_path}/slurm-%j.out
export WANDB_MODE=disabled OMP_NUM_THREADS=1
srun {sys.executable} -m diffguide.run {args} out_dir={tmp_path / 'two'}
""")
    proc = subprocess.run(["sbatch", "--wait", str(script)], capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert proc.returncode == 0, logs[-3000:]
    assert run_cli("diffguide.run", *args.split(), f"out_dir={tmp_path / 'one'}").returncode == 0
    result = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert result["processes"] == 2 and result["images_generated"] == 6
    for i in range(6):
        name = f"{i:06d}.png"
        assert (tmp_path / "two" / "samples" / name).read_bytes() == (tmp_path / "one" / "samples" / name).read_bytes()


@pytest.mark.slow
@pytest.mark.skipif(NOT_READY is not None, reason=str(NOT_READY))
def test_a_requeued_sweep_job_resumes_from_its_samples(tiny_unet_path, tmp_path):
    """Preemption: `scontrol requeue` of a running sweep job; Slurm stops it and starts it again, submitit runs the
    same call, and the run makes only the samples that were missing. (Minutes: Slurm lets the job run on for its
    KillWait after the requeue, and delays the restart; 60 samples keep the first attempt from finishing first.)"""
    import time

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "diffguide.run", "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10",
           "guidance=cfg", f"model.weights={tiny_unet_path}", "metric=none", "logger=none", "steps=400",
           "num_samples=60", "batch_size=2", f"out_dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(list(sweep.glob("*/samples/*.png"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    [job] = [line.split()[0] for line in subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i %o"],
                                                        capture_output=True, text=True).stdout.splitlines()
             if str(sweep) in line] or [None]
    assert job is not None, "the sweep job is not running"
    subprocess.run(["scontrol", "requeue", job], check=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    [metrics] = sweep.glob("*/metrics.json")
    result = json.loads(metrics.read_text())
    assert len(list(sweep.glob("*/samples/*.png"))) == 60
    assert result["images_generated"] < 60  # the restarted job made only the missing samples


SWEEP = ["guidance=cfg,none", "metric=none", "logger=none", "steps=2", "num_samples=3"]


@pytest.mark.skipif(NOT_READY is not None, reason=str(NOT_READY))
def test_the_gpu_preset_on_a_cpu_only_cluster_is_one_line_before_any_submission(tmp_path):
    """The local cluster's node has no GPUs: the slurm preset's gpus_per_node=1 is named in one line (sbatch would
    answer with a 54-line submitit traceback), said once for the whole sweep, and nothing is submitted."""
    proc = run_cli("diffguide.run", "-m", "hydra/launcher=slurm", *SWEEP, f"out_dir={tmp_path / 's'}")
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith("diffguide: error: hydra.launcher.gpus_per_node=1: the default partition has no GPUs")
    assert line.endswith("(every point of the sweep)") and not (tmp_path / "s" / ".submitit").exists()


@pytest.mark.skipif(NOT_READY is not None, reason=str(NOT_READY))
def test_the_cpu_preset_sweeps_with_nothing_on_stderr(tmp_path):
    """hydra/launcher=slurm_cpu on the local cluster, whose accounting is off: no sacct warning reaches stderr."""
    proc = run_cli("diffguide.run", "-m", "hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1",
                   "hydra.launcher.mem_gb=2", *SWEEP, f"out_dir={tmp_path / 's'}", timeout=600)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert len(list((tmp_path / "s").glob("*/metrics.json"))) == 2


@pytest.mark.skipif(NOT_READY is not None, reason=str(NOT_READY))
def test_a_submission_sbatch_refuses_is_one_line(tmp_path):
    proc = run_cli("diffguide.run", "-m", "hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1",
                   "+hydra.launcher.additional_parameters.bogus=1", *SWEEP, f"out_dir={tmp_path / 's'}")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["diffguide: error: Slurm: sbatch: unrecognized option '--bogus=1'"]


def _fake_sinfo(tmp_path, monkeypatch, table: str):
    """A `sinfo` on PATH that prints `table` (partition and gres per line), as `sinfo -h -o "%P %G"` does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "sinfo"
    script.write_text(f"#!/bin/sh\ncat <<'END'\n{table}\nEND\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_the_gpu_check_reads_the_partitions_gres(tmp_path, monkeypatch):
    """sinfo's `%P %G`: the default partition (marked *) is checked when none is named."""
    from diffguide.errors import UserError
    from diffguide.runtime import slurm

    _fake_sinfo(tmp_path, monkeypatch, "cpu* (null)\ngpu gpu:a100:4")
    slurm.check_gpus.cache_clear()
    with pytest.raises(UserError, match=r"gpus_per_node=1: the default partition has no GPUs \(sinfo: gres \(null\)\)"):
        slurm.check_gpus(1, None)
    slurm.check_gpus(0, None)
    _fake_sinfo_gpu = "gpu gpu:a100:4"
    (tmp_path / "bin" / "sinfo").write_text(f"#!/bin/sh\necho '{_fake_sinfo_gpu}'\n")
    slurm.check_gpus.cache_clear()
    slurm.check_gpus(1, "gpu")
    slurm.check_gpus.cache_clear()
