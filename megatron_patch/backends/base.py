"""What every device backend provides."""
from __future__ import annotations

from typing import Optional

from .registry import PatchRegistry


class Backend:
    name = "base"
    dist_backend = "gloo"  # torch.distributed backend for process groups
    # host buffers that receive device copies (activation and optimizer offload) are pinned,
    # so the copies run asynchronously; without an accelerator there is nothing to pin
    pins_host_memory = False

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
        # megatron-core patches land when megatron.core is imported (at once if it already
        # is); megatron.core.jit's as soon as it is, which is in the middle of megatron.core's
        # import, before the modules that decorate functions with its jit_fuser
        self.registry.apply(defer_until_imported=("megatron.core.jit", "megatron.core"))

    def deactivate(self) -> None:
        self.registry.remove()

    def device(self, local_rank: int = 0):
        import torch
        return torch.device("cpu")

    def set_device(self, local_rank: int) -> None:
        pass

    def device_memory(self, local_rank: int = 0):
        """(free, total) bytes of the device's memory, or None when the device IS the host
        (offloading to host memory then gains nothing)."""
        return None

    def activation_offload_overrides(self, num_layers: int, pp: int, total_layers: int):
        """TransformerConfig fields for AC=offload when this backend offloads activations
        itself (Transformer Engine's offload context), else None: the trainer then attaches
        plain torch saved-tensor hooks (training/offload.py)."""
        return None

    def block_spec(self, config, vp_stage=None):
        from megatron_patch.backends.layer_specs import local_block_spec
        return local_block_spec(config, vp_stage)

    def training_overrides(self, flash_attn: bool, precision: str,
                           cp_comm_type: Optional[str] = None) -> dict:
        """TransformerConfig fields this backend sets for a training run: its kernel choices
        (``kernel_overrides``: FL, and Transformer Engine's context-parallel exchange
        ``cp_comm_type`` where TE runs CP; our own CP attention all-gathers K/V) and, for
        PR=fp8, those of its fp8 path (``fp8_path``)."""
        overrides = self.kernel_overrides(flash_attn, cp_comm_type)
        if precision == "fp8":
            overrides.update(self.fp8_path().config_overrides())
        return overrides

    def kernel_overrides(self, flash_attn: bool, cp_comm_type: Optional[str] = None) -> dict:
        """Kernel and device choices (fused kernels, attention, where weights are
        initialised): none beyond models/llama/config.py's defaults (every fused kernel off)
        unless the backend knows the package providing a kernel is there."""
        return {}

    def fp8_path(self):
        """How PR=fp8 runs on this backend (megatron_patch.transformer.fp8); raises
        Fp8Unavailable (one line) when it cannot, never falls back to bf16 silently.
        Default (cpu): torchao with emulated float8 matmuls -- fp8 numerics, for testing."""
        from megatron_patch.transformer import fp8
        return fp8.torchao_path(emulate=True)
