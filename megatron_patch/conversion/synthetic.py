"""Random HF Llama checkpoints on disk (config.json + sharded safetensors + index), for the
converter's tests and benchmarks: no hub download, any shape, any dtype."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch

from megatron_patch.models.llama.arch import LlamaArch
from megatron_patch.models.llama.presets import get_preset

from megatron_patch.models.llama import mapping
from .hf_files import SafetensorsStreamWriter


def small_arch(generation: str = "llama3_1", vocab_size: int = 1000, hidden_size: int = 64,
               ffn_hidden_size: int = 96, tie_word_embeddings: bool = False,
               **overrides) -> LlamaArch:
    """The generation's tiny preset (4 layers, 4 heads, its KV heads, rope settings) made
    smaller still; vocab 1000 is not a multiple of 128, so padding is exercised."""
    base = get_preset(generation, "tiny")
    fields = dict(dataclasses.asdict(base), vocab_size=vocab_size, hidden_size=hidden_size,
                  ffn_hidden_size=ffn_hidden_size, tie_word_embeddings=tie_word_embeddings,
                  head_dim=None)
    fields.update(overrides)
    return LlamaArch(**fields)


def random_hf_state(arch: LlamaArch, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Weights like transformers' init (normal, std 0.02) with norm weights near 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in mapping.hf_tensor_plan(arch):
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = arch.initializer_range * torch.randn(shape, generator=g)
        out[name] = t.to(dtype)
    return out


def write_hf_checkpoint(path: str, arch: LlamaArch, state: Optional[dict] = None,
                        dtype: torch.dtype = torch.float32, shard_bytes: int = 2**30,
                        seed: int = 0) -> dict:
    """Write config.json (Meta's rope_theta/rope_scaling style) and the weights; returns
    the state written."""
    state = random_hf_state(arch, dtype, seed) if state is None else state
    os.makedirs(path, exist_ok=True)
    cfg = dict(arch.to_hf_config(), torch_dtype=str(dtype).replace("torch.", ""))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    plan = mapping.hf_tensor_plan(arch)
    w = SafetensorsStreamWriter(path, plan, dtype, shard_bytes)
    for name, _ in plan:
        w.write(name, state[name])
    w.close()
    return state
