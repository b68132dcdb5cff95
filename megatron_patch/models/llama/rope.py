"""Rotary inverse frequencies for Llama exactly as transformers computes them (default,
linear and llama3 rope types), with the config's own numbers, for megatron-core's rotary
module. megatron-core's ``RotaryEmbedding`` only applies llama3 scaling with a configurable
``factor`` (the other three numbers fixed at Llama-3.1's); its ``_apply_scaling`` does take
all four, so the llama3 case calls it with the config's values.
"""
from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from .arch import LlamaArch


def inv_freq(arch: LlamaArch, device=None) -> torch.Tensor:
    dim = arch.head_dim
    base = arch.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = arch.rope_scaling
    if not scaling:
        return freqs
    kind = scaling.get("rope_type")
    if kind == "linear":
        return freqs / float(scaling["factor"])
    if kind == "llama3":
        # _apply_scaling reads nothing from self (megatron-core 0.16.1)
        return RotaryEmbedding._apply_scaling(
            None, freqs, factor=float(scaling["factor"]),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=float(
                scaling.get("original_max_position_embeddings", 8192)))
    raise ValueError(f"unsupported rope_type {kind!r}")
