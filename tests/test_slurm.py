"""A sweep through `hydra/launcher=slurm` on a real Slurm cluster: the single-node one that
scripts/slurm_local.sh starts on this machine (CI starts it before the tests). Skipped, with the reason, only where
no Slurm controller answers."""

import json
import shutil
import subprocess

import pytest

from tests.conftest import run_cli


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
