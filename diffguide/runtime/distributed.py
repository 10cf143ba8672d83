"""One run over several processes: `torchrun --nproc_per_node=N -m diffguide.run ...`, or a Slurm job with several
tasks. Every sample has its own seed, so rank r makes the missing samples i with i % N == r and the union of the
shards is exactly the images of a one-process run; rank 0 scores them once all shards are written.

torch.distributed does the process group; under Slurm without torchrun, submitit's TorchDistributedEnvironment
supplies the RANK / WORLD_SIZE / MASTER_ADDR variables torch reads.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, indices: list[int]) -> list[int]:
        return [i for i in indices if i % self.world == self.rank]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def total(self, value: float) -> float:
        """The sum of `value` over the ranks (every rank gets it)."""
        return self._reduce(value, dist.ReduceOp.SUM) if self.world > 1 else value

    def maximum(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX) if self.world > 1 else value

    @staticmethod
    def _reduce(value: float, op) -> float:
        tensor = torch.tensor([float(value)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=op)
        return float(tensor.item())


def setup(device: torch.device) -> tuple[Shard, torch.device]:
    """Join the process group when this process is one of several; returns its shard and its device (each rank
    its own GPU, by LOCAL_RANK)."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        import submitit

        # srun tasks of an sbatch script: submitit reads the Slurm variables (rank, node list, master address) once
        # told it runs under Slurm, which its own jobs tell it through SUBMITIT_EXECUTOR.
        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Shard(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Shard(dist.get_rank(), dist.get_world_size()), device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
