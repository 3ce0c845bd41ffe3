"""Data-parallel training with torch.distributed (launched by ``torchrun``).

Backend: gloo on CPU, nccl on CUDA. Every rank builds the same global batches — a pure function
of (seed, epoch), see :func:`polarmace.data.batching.epoch_batches` — and takes its contiguous
shard of each one (:func:`shard`). The loss denominators are summed over ranks before the loss is
formed and the gradients are then all-reduced with SUM, so the update equals the single-process
update on the global batch (up to floating-point summation order). We all-reduce gradients by
hand instead of wrapping the model in DistributedDataParallel: the model differentiates its
energy inside forward (forces, stress), which DDP's backward hooks do not handle cleanly.

Usage::

    torchrun --nproc_per_node=2 -m polarmace.cli.train config.yaml
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_requests_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu", timeout_s: float = 600.0) -> DistInfo:
    """Initialise the process group from torchrun's environment (no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())
    if not env_requests_distributed():
        return DistInfo()
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # a rank tearing gloo down while a peer still talks to it aborts the peer
        dist.destroy_process_group()


def shard(items: Sequence, rank: int, world_size: int) -> List:
    """Contiguous shard `rank` of `items` split into `world_size` nearly equal parts."""
    n = len(items)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return list(items[start:stop])


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place SUM over ranks (returns the tensor; no-op when not distributed)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_gradients(model: torch.nn.Module, info: DistInfo) -> None:
    """SUM the gradients of all trainable parameters over ranks (one flat buffer per dtype).

    A parameter without a gradient on this rank contributes zeros, so ranks whose shard does not
    touch a parameter (e.g. an element absent from the shard) stay in lockstep.
    """
    if not info.enabled:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    by_dtype = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


@torch.no_grad()
def broadcast_parameters(model: torch.nn.Module, info: DistInfo) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if not info.enabled:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
