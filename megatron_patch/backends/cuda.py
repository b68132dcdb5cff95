"""cuda backend: NCCL process groups; Transformer Engine layer spec when TE imports, else
megatron-core's local spec with SDPA core attention (flash/cuDNN kernels, no apex)."""
from __future__ import annotations

from typing import Optional

import torch

from .base import Backend


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import megatron.core.extensions.transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


class CudaBackend(Backend):
    name = "cuda"
    dist_backend = "nccl"

    @classmethod
    def available(cls) -> bool:
        return torch.cuda.is_available()

    @classmethod
    def unavailable_reason(cls) -> str:
        return ("MEGATRON_PATCH_BACKEND=cuda but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cuda", local_rank)

    def set_device(self, local_rank: int) -> None:
        torch.cuda.set_device(local_rank)

    def block_spec(self, config, vp_stage=None):
        from megatron_patch.backends import layer_specs
        if te_available():
            return layer_specs.te_block_spec(config, vp_stage)
        return layer_specs.local_block_spec(config, vp_stage)

    def training_overrides(self, flash_attn: bool, precision: str,
                           cp_comm_type: Optional[str] = None) -> dict:
        overrides = super().training_overrides(flash_attn, precision, cp_comm_type)
        if te_available():
            # CP>1: TE's attention runs context parallelism itself (p2p: ring exchange of
            # K/V overlapped with compute; all_gather; a2a: heads all-to-all)
            if cp_comm_type:
                overrides["cp_comm_type"] = cp_comm_type
            # FL: Transformer Engine's flash attention (true) or its cuDNN fused attention
            # (false), like Pai's NVTE_FLASH_ATTN/NVTE_FUSED_ATTN switch. Without TE the SDPA
            # core attention is used (flash kernels on CUDA when available).
            from megatron.core.transformer.enums import AttnBackend
            overrides["attention_backend"] = AttnBackend.flash if flash_attn else AttnBackend.fused
        return overrides
