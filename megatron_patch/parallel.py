"""torch.distributed + megatron-core model-parallel initialisation for any backend."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_patch.ports import free_port  # noqa: F401  (re-exported)


def init_distributed(timeout_s: int = 600) -> tuple[int, int, int]:
    """Init the default process group from torchrun's env (or a 1-process group).
    Returns (rank, world_size, local_rank)."""
    from megatron_patch.backends import active_backend
    backend = active_backend()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        # An address is given explicitly rather than written into os.environ: a port left
        # in MASTER_PORT would be inherited by child processes (tests, launchers) and
        # collide with the store this process still holds.
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = os.environ.get("MASTER_PORT") or str(free_port())
        backend.set_device(local_rank)
        dist.init_process_group(backend.dist_backend, init_method=f"tcp://{addr}:{port}",
                                rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), local_rank


def initialize_model_parallel(tp: int = 1, pp: int = 1, cp: int = 1, vp: Optional[int] = None,
                              seed: int = 1234) -> None:
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by TP*PP*CP = {tp * pp * cp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        context_parallel_size=cp, virtual_pipeline_model_parallel_size=vp)
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Same data-parallel seed everywhere, +100*pp_rank like Megatron; TP tracker seeded."""
    import random

    import numpy as np
    s = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    model_parallel_cuda_manual_seed(s)


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
