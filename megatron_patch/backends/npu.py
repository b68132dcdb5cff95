"""npu backend (Ascend): torch_npu + transfer_to_npu, hccl, fused ops the MindSpeed way.

torch_npu is imported only when the backend is probed (auto/npu) or activated, never by
other backends. Patches (each fails loudly if megatron-core moved its target):
- RMSNorm.forward -> npu_rms_norm
- rope_utils._apply_rotary_pos_emb_bshd -> npu_rotary_mul: in 0.16.1 every unfused rope path
  (attention.apply_rotary_pos_emb for bshd and thd, apply_rotary_pos_emb_with_cos_sin) ends
  there; apply_rope_fusion=True means Transformer Engine, which Ascend does not have.
- mlp.bias_swiglu_impl -> npu_swiglu: with bias_activation_fusion=False MLP applies the gate
  in an inline closure (nothing to patch); the fused branch calls this name, so block_spec()
  turns that branch on (what MindSpeed's --swiglu does).
- tensor_parallel.random._get/_set_cuda_rng_state -> torch.npu's generator.
- core attention: NpuFusedAttention (npu_fusion_attention, SBH, causal via sparse_mode 2).
Real Ascend runs are untested here; tests drive this with a fake torch_npu (backends/npu/).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import Backend


def _probe() -> Optional[str]:
    """None when torch_npu imports and reports a device, else why not."""
    try:
        import torch_npu  # noqa: F401
    except ImportError as exc:
        return f"`import torch_npu` failed: {exc}"
    except Exception as exc:  # e.g. CANN's shared libraries missing
        return f"`import torch_npu` failed: {type(exc).__name__}: {exc}"
    npu = getattr(torch, "npu", None)
    try:
        ok = npu is not None and npu.is_available() and npu.device_count() > 0
    except Exception as exc:
        return f"torch.npu.is_available() raised {type(exc).__name__}: {exc}"
    if not ok:
        return ("torch_npu imported but reports no Ascend device (check the driver with "
                "`npu-smi info`, that CANN's set_env.sh is sourced, ASCEND_RT_VISIBLE_DEVICES)")
    return None


def _enable_fused_swiglu(config) -> None:
    """Route MLP's gate through bias_swiglu_impl (patched to npu_swiglu) when that branch
    computes exactly the same function as the unfused one."""
    if (config.gated_linear_unit and config.activation_func is F.silu
            and not config.use_te_activation_func and config.glu_linear_offset == 0.0
            and getattr(config, "activation_func_clamp_value", None) is None):
        config.bias_activation_fusion = True


class NpuBackend(Backend):
    name = "npu"
    dist_backend = "hccl"

    @classmethod
    def available(cls) -> bool:
        return _probe() is None

    @classmethod
    def unavailable_reason(cls) -> str:
        why = _probe() or "unknown reason"
        return ("MEGATRON_PATCH_BACKEND=npu needs torch_npu (Ascend's PyTorch adapter) and the "
                f"CANN toolkit with an Ascend NPU: {why}. Install CANN and the torch_npu build "
                f"matching torch {torch.__version__} (see backends/npu/README.md), or set "
                "MEGATRON_PATCH_BACKEND=cpu|cuda|auto.")

    def register_patches(self) -> None:
        from megatron_patch.transformer import npu_ops

        from . import offload_fixes
        r = self.registry
        offload_fixes.register(r)  # OPTIMIZER_OFFLOAD (docs/memory.md)
        r.register("megatron_patch.transformer.norm.RMSNorm.forward", npu_ops.rmsnorm_forward,
                   reason="fused RMSNorm kernel (torch_npu.npu_rms_norm)")
        r.register("megatron.core.models.common.embeddings.rope_utils._apply_rotary_pos_emb_bshd",
                   wrapper=npu_ops.fused_rotary_bshd,
                   reason="all unfused rope paths of 0.16.1 end here; fused npu_rotary_mul")
        r.register("megatron.core.transformer.mlp.bias_swiglu_impl", npu_ops.bias_swiglu,
                   reason="MLP's fused gate (imported by name into mlp.py); npu_swiglu")
        r.register("megatron.core.tensor_parallel.random._get_cuda_rng_state",
                   npu_ops.get_rng_state,
                   reason="RNG tracker fork/recompute must read the NPU generator")
        r.register("megatron.core.tensor_parallel.random._set_cuda_rng_state",
                   npu_ops.set_rng_state,
                   reason="megatron bound torch.cuda._lazy_call, which never runs on NPU")

    def activate(self) -> None:
        import torch_npu  # noqa: F401  (registers torch.npu, hccl)
        # maps torch.cuda.* / "cuda" devices to the NPU and nccl to hccl for megatron-core
        import torch_npu.contrib.transfer_to_npu  # noqa: F401
        super().activate()

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("npu", local_rank)

    def set_device(self, local_rank: int) -> None:
        torch.npu.set_device(local_rank)

    def device_memory(self, local_rank: int = 0):
        return torch.npu.mem_get_info(local_rank)

    def block_spec(self, config, vp_stage=None):
        from megatron_patch.backends.layer_specs import local_block_spec
        from megatron_patch.transformer.npu_ops import NpuFusedAttention
        _enable_fused_swiglu(config)
        return local_block_spec(config, vp_stage, attention_cls=NpuFusedAttention)

    def fp8_path(self):
        from megatron_patch.transformer.fp8 import Fp8Unavailable
        raise Fp8Unavailable("PR='fp8' is not supported on the npu backend (no float8 matmul "
                             "path for Ascend here); use bf16")
