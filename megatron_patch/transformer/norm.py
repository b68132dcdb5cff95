"""RMSNorm for the local layer spec, computed like HF's LlamaRMSNorm (fp32 statistics).

megatron-core's WrappedTorchNorm refuses sequence parallelism; a norm is elementwise per
token, so under SP it only needs its weight gradient all-reduced over the TP group, which
megatron's DDP/finalize_model_grads do for params tagged ``sequence_parallel``.
"""
from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
