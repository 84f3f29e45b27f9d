"""Process-group set-up for ``torchrun``: NCCL on GPUs, gloo on CPUs; a single process needs no launcher."""
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        """This rank's share of indices 0..n-1 for evaluation: every index on exactly one rank (DistributedSampler
        pads to a multiple of the world size by repeating samples, which would count them twice)."""
        return list(range(self.rank, n, self.world_size))

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def all_true_each(self, *flags: bool) -> list[bool]:
        """Per flag: True on every rank only if it is true on every rank (one collective for all)."""
        if not self.distributed:
            return list(flags)
        t = torch.tensor([1 if f else 0 for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return [bool(v) for v in t.tolist()]

    def any_each(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise: 1 where any rank has a non-zero flag (an int8 tensor of the same length on every rank)."""
        if not self.distributed:
            return flags
        t = flags.to(self.device, torch.int32)  # NCCL and gloo both reduce int32
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.to('cpu', flags.dtype)

    def all_true(self, flag: bool) -> bool:
        """True on every rank only if ``flag`` is true on every rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())


def launched_as_main() -> bool:
    """Whether this process is rank 0 of its launch (torchrun's ``RANK``; a plain process is): the one that prints
    results for people, since other ranks do not hold the run's bookkeeping (best epoch, files)."""
    return int(os.environ.get('RANK', 0)) == 0


def init_distributed(device: Optional[str] = None) -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group when there are several ranks."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev = torch.device(device)
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'--device {device} requested but CUDA is not available; use --device cpu')
        dev = torch.device('cuda', local_rank if world_size > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == 'cuda':
            dist.init_process_group(backend='nccl', device_id=dev)
        else:
            dist.init_process_group(backend='gloo')
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
