"""Multi-process training helpers over ``torch.distributed`` (torchrun sets the env).

In-batch negatives span the global batch: every rank gathers the encodings of
all ranks, keeping the autograd graph for its own part (as open_clip does), and
computes the loss over the global score matrix. DDP then averages gradients
over ranks, so each rank's loss is multiplied by the world size: the update
equals a single process's on the concatenated batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .model import Encoded

__all__ = ["DistInfo", "init_distributed", "gather_with_grad", "gather_encoded", "cleanup"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); ``gloo`` on CPU, ``nccl`` on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        log.info("rank %d/%d joined the %s process group", rank, world, backend)
    return DistInfo(rank, world, local_rank)


def cleanup() -> None:
    """Leave the process group together: a rank that tears gloo down while another is still
    working can abort ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _pad_dim(x: Tensor, dim: int, size: int) -> Tensor:
    pad = size - x.shape[dim]
    if pad <= 0:
        return x
    spec = [0, 0] * (x.dim() - dim - 1) + [0, pad]
    return F.pad(x, spec)


def gather_with_grad(x: Tensor, info: DistInfo) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0; gradients flow to this rank's part only."""
    if not info.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(info.world)]
    dist.all_gather(parts, x.contiguous())
    parts[info.rank] = x
    return torch.cat(parts, 0)


def gather_encoded(enc: Encoded, info: DistInfo) -> Encoded:
    """Gather an ``Encoded`` from all ranks, padding locals/masks/Grams to the longest sequence."""
    if not info.enabled:
        return enc
    n = torch.tensor([enc.local.shape[1]], device=enc.local.device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    size = int(n.item())
    local = _pad_dim(enc.local, 1, size)
    mask = _pad_dim(enc.mask, 1, size)
    gram = _pad_dim(_pad_dim(enc.gram, 1, size), 2, size)
    return Encoded(
        *(gather_with_grad(t, info) for t in (enc.stage1, local, mask, gram, enc.glob, enc.summary))
    )
