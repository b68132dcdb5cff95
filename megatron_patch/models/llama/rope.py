"""Rotary inverse frequencies exactly as transformers computes them for Llama
(default, linear and llama3 rope types), so megatron-core's rotary module can use them."""
from __future__ import annotations

import math

import torch

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
        return _llama3(freqs, float(scaling["factor"]), float(scaling.get("low_freq_factor", 1.0)),
                       float(scaling.get("high_freq_factor", 4.0)),
                       float(scaling.get("original_max_position_embeddings", 8192)))
    raise ValueError(f"unsupported rope_type {kind!r}")


def _llama3(freqs, factor, low_freq_factor, high_freq_factor, old_ctx):
    # Llama-3.1: long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated smoothly (Meta's reference, same formula as transformers' llama3 rope).
    low_freq_wavelen = old_ctx / low_freq_factor
    high_freq_wavelen = old_ctx / high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, freqs)
    smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)
