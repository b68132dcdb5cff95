"""What every device backend provides."""
from __future__ import annotations

import torch

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

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def set_device(self, local_rank: int) -> None:
        pass

    def block_spec(self, config, vp_stage=None):
        from megatron_patch.backends.layer_specs import local_block_spec
        return local_block_spec(config, vp_stage)
