"""torchrun support: process-group setup from the environment, and the few collectives the loop needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup() -> Dist:
    """Join the process group torchrun describes in RANK/WORLD_SIZE (NCCL on GPUs, gloo on CPUs)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return Dist(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # the ranks share the machine's cores: each takes its share instead of all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    return Dist(rank, world, local, device)


def mean(value: float | torch.Tensor, d: Dist) -> float:
    """The average of a scalar over all ranks."""
    if not d.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world


def sum_(values: list[float], d: Dist) -> list[float]:
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def any_(flag: bool, d: Dist) -> bool:
    return sum_([float(flag)], d)[0] > 0 if d.enabled else flag


def barrier(d: Dist):
    if d.enabled:
        dist.barrier()


def teardown(d: Dist):
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
