"""The processes of one training run: one, or several under ``torchrun`` (DDP; only rank 0 writes files)."""
from __future__ import annotations

import os

import torch

from manidp.errors import UserError

__all__ = ["Distributed"]


class Distributed:
    """This process's rank, world size and device, read from torchrun's environment; the process group
    (gloo on CPU, nccl on GPU) is joined when there are several."""

    def __init__(self, device_pref: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise UserError("runtime.device is 'cuda' but no CUDA device is available; set runtime.device: cpu")
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
