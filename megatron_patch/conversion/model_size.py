"""MODEL_SIZE (``auto``, ``llama3_1-8B``, ``llama2-13B``, ``llama3_1-tiny``...) + config.json
-> the LlamaArch to convert, refusing a size that disagrees with the checkpoint's config."""
from __future__ import annotations

import os
from typing import Optional

from megatron_patch.models.llama.arch import LlamaArch
from megatron_patch.models.llama.presets import get_preset, parse_model_size

# fields that decide tensor shapes or the math: a mismatch means the wrong model
_COMPARED = ("hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads",
             "ffn_hidden_size", "vocab_size", "head_dim", "rope_theta", "tie_word_embeddings")


def arch_differences(expected: LlamaArch, actual: LlamaArch) -> list:
    diffs = [f"{f} {getattr(expected, f)} vs {getattr(actual, f)}" for f in _COMPARED
             if getattr(expected, f) != getattr(actual, f)]
    e_rope = (expected.rope_scaling or {}).get("rope_type")
    a_rope = (actual.rope_scaling or {}).get("rope_type")
    if e_rope != a_rope:
        diffs.append(f"rope scaling {e_rope} vs {a_rope}")
    return diffs


def resolve_arch(model_size: str, config_path: Optional[str], what: str = "config.json") -> LlamaArch:
    """``config_path``: a config.json (or its directory), or None when there is none."""
    if config_path and os.path.isdir(config_path):
        config_path = os.path.join(config_path, "config.json")
    have_cfg = bool(config_path) and os.path.isfile(config_path)
    if model_size == "auto":
        if not have_cfg:
            raise FileNotFoundError(f"MODEL_SIZE=auto needs {config_path or 'config.json'}, "
                                    f"which is missing")
        return LlamaArch.from_hf_config(config_path)
    generation, size = parse_model_size(model_size)
    preset = get_preset(generation, size)
    if not have_cfg:
        return preset
    arch = LlamaArch.from_hf_config(config_path, generation=generation)
    diffs = arch_differences(preset, arch)
    if diffs:
        raise ValueError(f"MODEL_SIZE={model_size} disagrees with {what} ({config_path}): "
                         f"{'; '.join(diffs)} (preset vs config); use MODEL_SIZE=auto to take "
                         f"every shape from config.json")
    return arch
