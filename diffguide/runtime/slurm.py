"""What `hydra/launcher=slurm` needs to know of the cluster before it submits: whether the partition has the GPUs the
launcher asks for (`sinfo`), and whether Slurm keeps accounting (`scontrol show config`). submitit polls `sacct` for
the jobs' states; with accounting off, every poll prints sacct's "accounting storage is disabled" and submitit's
"Bypassing sacct error" (12 lines for a 2-point sweep), and the states it would read are not there: a job's end is
then known by its result file, as submitit already falls back to. So the polls are skipped."""

import functools
import shutil
import subprocess

from diffguide.errors import UserError


def _run(command: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None


def accounting_enabled() -> bool | None:
    """False where the controller says AccountingStorageType = accounting_storage/none, None where it cannot say."""
    proc = _run(["scontrol", "show", "config"])
    if proc is None or proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        if line.split("=", 1)[0].strip() == "AccountingStorageType":
            return line.split("=", 1)[1].strip() != "accounting_storage/none"
    return None


def prepare_launch() -> None:
    """Before a sweep is submitted: with accounting off, submitit's watcher polls nothing (its jobs end when their
    result files appear); and a command submitit runs (sbatch) that fails does not print its stderr, as submitit
    does before raising it: the error it raises is the command's one line (`run._reason`)."""
    import contextlib
    import io

    from submitit.core import utils

    if accounting_enabled() is False:
        from submitit.slurm.slurm import SlurmInfoWatcher

        SlurmInfoWatcher._make_command = lambda self: None
    call = utils.CommandFunction.__call__
    if getattr(call, "_diffguide_quiet", False):
        return

    def quiet_call(self, *args, **kwargs):
        with contextlib.redirect_stderr(io.StringIO()):
            return call(self, *args, **kwargs)

    quiet_call._diffguide_quiet = True
    utils.CommandFunction.__call__ = quiet_call


@functools.lru_cache(maxsize=None)  # once per command, not once per point of a sweep
def check_gpus(gpus_per_node, partition) -> None:
    """One line, before anything is submitted, where the launcher asks for GPUs the partition does not have (sbatch
    would refuse with "Invalid generic resource (gres) specification", after Hydra has set the sweep up), or where
    no Slurm answers."""
    command = ["sinfo", "-h", "-o", "%P %G"] + (["-p", str(partition)] if partition else [])
    proc = _run(command)
    if proc is None:
        raise UserError("hydra/launcher=slurm needs Slurm's sinfo and sbatch on PATH (a cluster's login node), or "
                        "run without hydra/launcher=slurm")
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        raise UserError(f"hydra/launcher=slurm: Slurm does not answer ({why})")
    rows = [line.split(None, 1) for line in proc.stdout.splitlines() if line.strip()]
    if not partition:  # sbatch submits to the default partition, the one sinfo marks with *
        rows = [r for r in rows if r[0].endswith("*")] or rows
    if not rows:
        raise UserError(f"hydra.launcher.partition={partition}: no such partition (sinfo lists none)")
    if not gpus_per_node:
        return
    with_gpus = [p.rstrip("*") for p, *gres in rows if gres and "gpu" in gres[0]]
    if not with_gpus:
        where = f"partition {partition}" if partition else "the default partition"
        raise UserError(f"hydra.launcher.gpus_per_node={gpus_per_node}: {where} has no GPUs (sinfo: gres "
                        f"{rows[0][1] if len(rows[0]) > 1 else 'none'}); set hydra.launcher.gpus_per_node=0 or use "
                        f"hydra/launcher=slurm_cpu on a CPU-only cluster, or name a GPU partition with "
                        f"hydra.launcher.partition=")
