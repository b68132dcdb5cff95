"""Model chunks wrapped in megatron-core DDP, and the megatron-core optimizer."""
from __future__ import annotations

import os
from typing import Optional

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer import TransformerConfig

from megatron_patch.backends import active_backend
from megatron_patch.models.llama.arch import LlamaArch
from megatron_patch.models.llama.provider import build_llama


def build_model_chunks(arch: LlamaArch, config: TransformerConfig, wrap_ddp: bool = True,
                       use_distributed_optimizer: bool = False,
                       overlap_grad_reduce: bool = False) -> list:
    """One chunk per virtual pipeline stage (one chunk without VPP), moved to the backend's
    device and wrapped in megatron-core's DistributedDataParallel."""
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = range(vp) if vp else [None]
    device = active_backend().device(int(os.environ.get("LOCAL_RANK", 0)))
    # params are created in params_dtype, so no Float16Module wrapper is needed
    chunks = [build_llama(arch, config, vp_stage=vp_stage).to(device) for vp_stage in stages]
    if not wrap_ddp:
        return chunks
    ddp = ddp_config(use_distributed_optimizer, overlap_grad_reduce)
    wrapped = []
    for i, model in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=config, ddp_config=ddp, module=model,
            # bucketing of later chunks is disabled like Megatron-LM (only chunk 0 overlaps)
            disable_bucketing=i > 0))
    return wrapped


def ddp_config(use_distributed_optimizer: bool = False,
               overlap_grad_reduce: bool = False) -> DistributedDataParallelConfig:
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer, check_for_nan_in_grad=False,
        bucket_size=None if not overlap_grad_reduce else 40_000_000)


def build_optimizer(chunks: list, config: TransformerConfig, **kwargs):
    """megatron-core's optimizer over the chunks; kwargs: optimizer_config's."""
    return get_megatron_optimizer(optimizer_config(config, **kwargs), chunks)


def optimizer_config(config: TransformerConfig, lr: float, min_lr: float = 0.0,
                     weight_decay: float = 0.1, clip_grad: float = 1.0,
                     use_distributed_optimizer: bool = False, adam_beta1: float = 0.9,
                     adam_beta2: float = 0.95, adam_eps: float = 1e-8,
                     initial_loss_scale: Optional[float] = None,
                     offload_fraction: Optional[float] = None) -> OptimizerConfig:
    """build_optimizer's megatron-core OptimizerConfig (precision from the model's config).
    ``offload_fraction`` (not None: OPTIMIZER_OFFLOAD) steps that fraction of the
    parameters' Adam state on the host (HybridDeviceOptimizer, torch AdamW there) on top of
    the distributed optimizer."""
    offload = {}
    if offload_fraction is not None:
        if not use_distributed_optimizer:
            raise ValueError("optimizer offload needs the distributed optimizer")
        offload = dict(
            optimizer_cpu_offload=True, optimizer_offload_fraction=float(offload_fraction),
            # bf16/fp16: the fp32 main weights live in the offloaded optimizer too (else the
            # distributed optimizer keeps them on the device); fp32 weights are their own
            # main weights, so there is nothing more to move
            use_precision_aware_optimizer=config.bf16 or config.fp16,
            overlap_cpu_optimizer_d2h_h2d=True,
            pin_cpu_grads=active_backend().pins_host_memory,
            pin_cpu_params=active_backend().pins_host_memory)
    return OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay,
        adam_beta1=adam_beta1, adam_beta2=adam_beta2, adam_eps=adam_eps,
        clip_grad=clip_grad, bf16=config.bf16, fp16=config.fp16,
        params_dtype=config.params_dtype, use_distributed_optimizer=use_distributed_optimizer,
        initial_loss_scale=initial_loss_scale if config.fp16 else None,
        loss_scale=None, **offload)
