"""npu backend (Ascend): placeholder until the fused-op wiring lands."""
from __future__ import annotations

from .base import Backend


class NpuBackend(Backend):
    name = "npu"
    dist_backend = "hccl"

    @classmethod
    def available(cls) -> bool:
        try:
            import torch_npu  # noqa: F401
        except Exception:
            return False
        import torch
        return bool(getattr(torch, "npu", None) and torch.npu.is_available())

    @classmethod
    def unavailable_reason(cls) -> str:
        return ("MEGATRON_PATCH_BACKEND=npu needs torch_npu (Ascend's PyTorch adapter) and the "
                "CANN toolkit with an Ascend device; `import torch_npu` failed or reported no device")
