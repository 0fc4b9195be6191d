"""torch.distributed in the few places the algorithm is global; every helper is the identity in a single
process, so single-process and multi-process training share one code path.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), ``init_from_env`` joins the process
group: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes, if any; returns the device this process trains on
    (``auto``: cuda, one GPU per local rank, when available, else cpu)."""
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor (equal shapes) concatenated along dim 0, in rank order."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks (``sum`` or ``max``); returns the tensor."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
