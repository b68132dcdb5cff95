"""What every device backend provides."""
from __future__ import annotations

from typing import Optional

from .registry import PatchRegistry


class Backend:
    name = "base"
    dist_backend = "gloo"  # torch.distributed backend for process groups

    def __init__(self):
        self.registry = PatchRegistry(self.name)
        self.register_patches()

    @classmethod
    def available(cls) -> bool:
        raise NotImplementedError

    @classmethod
    def unavailable_reason(cls) -> str:
        return f"backend {cls.name} is not available on this machine"

    def register_patches(self) -> None:
        """Register this backend's patches on self.registry (applied by activate())."""

    def activate(self) -> None:
        # megatron-core patches land when megatron.core is imported (at once if it already is)
        self.registry.apply(defer_until_imported=("megatron.core",))

    def deactivate(self) -> None:
        self.registry.remove()

    def device(self, local_rank: int = 0):
        import torch
        return torch.device("cpu")

    def set_device(self, local_rank: int) -> None:
        pass

    def block_spec(self, config, vp_stage=None):
        from megatron_patch.backends.layer_specs import local_block_spec
        return local_block_spec(config, vp_stage)

    def training_overrides(self, flash_attn: bool, precision: str,
                           cp_comm_type: Optional[str] = None) -> dict:
        """TransformerConfig fields this backend sets for a training run: kernel choices
        (FL), Transformer Engine's context-parallel communication (``cp_comm_type``; our
        own CP attention all-gathers K/V and ignores it) and the fp8 recipe (PR=fp8). fp8
        needs Transformer Engine: without it megatron-core's fp8 context is a silent no-op,
        so refuse rather than run in bf16."""
        if precision != "fp8":
            return {}
        from megatron_patch.backends.cuda import te_available
        if not te_available():
            raise ValueError("PR='fp8' needs Transformer Engine on CUDA (not importable here); "
                             "use bf16")
        # Pai's settings: hybrid format (E4M3 forward, E5M2 backward), delayed scaling
        return dict(fp8="hybrid", fp8_margin=0, fp8_amax_history_len=1024,
                    fp8_amax_compute_algo="max")
