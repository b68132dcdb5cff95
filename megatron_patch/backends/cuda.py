"""cuda backend: NCCL process groups; Transformer Engine layer spec when TE imports, else
megatron-core's local spec with SDPA core attention (flash/cuDNN kernels, no apex).

Kernel choices (``kernel_overrides``) ask for a fused kernel only when the package that
provides it is importable; models/llama/config.py turns every fused kernel off by default:

| TransformerConfig field        | needs                                  | on cuda                |
|--------------------------------|----------------------------------------|------------------------|
| attention_backend flash/fused  | Transformer Engine (TE spec)           | with TE (FL picks)     |
| apply_rope_fusion              | Transformer Engine's fused rope        | with TE                |
| gradient_accumulation_fusion   | apex's fused_weight_gradient_mlp_cuda  | with apex (not torchao fp8) |
| masked_softmax_fusion          | apex's scaled_masked_softmax_cuda      | off: SDPA / TE attention instead |
| persist_layer_norm             | apex's fast layer norm                 | off: our RMSNorm / TE's |
| bias_*_fusion                  | (torch jit; Llama has no biases)       | off                    |
| cross_entropy_loss_fusion      | (torch jit / TE)                       | off                    |
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from .base import Backend

# the first GPUs with float8 tensor cores (torch._scaled_mm): Ada (8.9), Hopper (9.0), later
FP8_MIN_CAPABILITY = (8, 9)


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import megatron.core.extensions.transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def module_importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def apex_grad_accum_available() -> bool:
    """apex's fused wgrad-accumulation kernel, which megatron-core's parallel linears call
    with gradient_accumulation_fusion=True (and refuse to build without)."""
    return module_importable("fused_weight_gradient_mlp_cuda")


class CudaBackend(Backend):
    name = "cuda"
    dist_backend = "nccl"
    pins_host_memory = True

    @classmethod
    def available(cls) -> bool:
        return torch.cuda.is_available()

    def register_patches(self) -> None:
        from . import offload_fixes
        offload_fixes.register(self.registry)  # OPTIMIZER_OFFLOAD (docs/memory.md)

    @classmethod
    def unavailable_reason(cls) -> str:
        return ("MEGATRON_PATCH_BACKEND=cuda but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cuda", local_rank)

    def set_device(self, local_rank: int) -> None:
        torch.cuda.set_device(local_rank)

    def device_memory(self, local_rank: int = 0):
        return torch.cuda.mem_get_info(local_rank)

    def activation_offload_overrides(self, num_layers: int, pp: int, total_layers: int):
        # megatron-core drives TE's offload context for the first cpu_offloading_num_layers
        # layers of the block; it refuses PP > 1 and offloading every layer (the last one's
        # activations are needed at once). Those cases take the torch hooks instead.
        if te_available() and pp == 1 and num_layers < total_layers:
            return dict(cpu_offloading=True, cpu_offloading_num_layers=num_layers,
                        cpu_offloading_activations=True, cpu_offloading_weights=False)
        return None

    def block_spec(self, config, vp_stage=None):
        from megatron_patch.backends import layer_specs
        if te_available():
            return layer_specs.te_block_spec(config, vp_stage)
        return layer_specs.local_block_spec(config, vp_stage)

    def kernel_overrides(self, flash_attn: bool, cp_comm_type: Optional[str] = None) -> dict:
        # initialise weights on the GPU (megatron's default): CPU initialisation of an
        # 8B-class model takes minutes and is thrown away when a checkpoint is loaded
        overrides = {"use_cpu_initialization": False}
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
            overrides["apply_rope_fusion"] = True
        if apex_grad_accum_available():
            overrides["gradient_accumulation_fusion"] = True
        return overrides

    def fp8_path(self):
        from megatron_patch.transformer import fp8
        if te_available():
            return fp8.TransformerEngineFp8()
        cap = tuple(torch.cuda.get_device_capability())
        if cap < FP8_MIN_CAPABILITY:
            raise fp8.Fp8Unavailable(
                f"PR='fp8' needs a GPU with float8 tensor cores (compute capability >= "
                f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}: Ada, Hopper or later); "
                f"{torch.cuda.get_device_name()} is {cap[0]}.{cap[1]}; use bf16")
        why = fp8.torchao_missing()
        if why is not None:
            raise fp8.Fp8Unavailable(f"PR='fp8' needs Transformer Engine or torchao: Transformer "
                                     f"Engine does not import and {why}; use bf16")
        return fp8.TorchaoFp8(emulate=False)
