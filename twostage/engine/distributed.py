"""Data parallelism through torch.distributed, started by torchrun (never a launcher of our own).

`torchrun --nproc_per_node=8 -m twostage ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the
run is a single process. NCCL on CUDA, gloo on CPU (used by the tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def resolve_device(name: str, world: World) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda was asked for but no CUDA device is visible; use train.device=cpu")
        if device.index is None:
            device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def init_world(process_group: bool = False) -> World:
    """Join the process group torchrun describes in the environment (if any). `process_group`: also
    make a one-process group when there is none (FSDP needs one even on a single device)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        if process_group and not dist.is_initialized():
            # gloo for CPU tensors, NCCL for CUDA ones: train.device is not resolved yet.
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and os.environ.get("TWOSTAGE_DEVICE", "auto") != "cpu"
        if use_nccl:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank)


def mean_across_ranks(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / world.size
    return values


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def deal_batches(num_batches: int, world: World, work, consume) -> None:
    """Global batches 0..num_batches-1 dealt round robin: in round k rank r runs `work(b)` for
    b = k * size + r, and rank 0 calls `consume(b, result)` for every b in order 0, 1, 2, ...

    Rank 0 therefore sees exactly the sequence a single process would produce (and can write one
    output from it) while holding at most one round of results; other ranks never call `consume`."""
    rounds = -(-num_batches // world.size)
    for k in range(rounds):
        b = k * world.size + world.rank
        result = work(b) if b < num_batches else None
        if not world.distributed:
            consume(b, result)
            continue
        parts = [None] * world.size if world.is_main else None
        dist.gather_object(result, parts, dst=0)  # pickled numpy: the batches' dtypes kept exactly
        if world.is_main:
            for r, part in enumerate(parts):
                if k * world.size + r < num_batches:
                    consume(k * world.size + r, part)
