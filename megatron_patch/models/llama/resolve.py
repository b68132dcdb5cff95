"""Which Llama is this? The one answer used by the launcher, the converter, inference and
evaluation.

Sources, combined: a model size (a preset: ``8B`` with a generation, or ``llama3_1-8B``;
``auto`` = read everything from config.json), an HF ``config.json`` (a file or a folder),
and a Megatron checkpoint (the config.json that the converter and the trainer write next to
it). When a size and a config.json are both known they must describe the same model: a
``MODEL_SIZE=8B`` run on a tiny checkpoint is refused here, before anything is built.
Standard library only (the launcher checks its arguments without importing torch).
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .arch import LlamaArch
from .presets import get_preset, normalize_generation, parse_model_size

# fields that decide tensor shapes or the math: a mismatch means another model
COMPARED_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads",
                   "ffn_hidden_size", "vocab_size", "head_dim", "rope_theta",
                   "tie_word_embeddings")


class ArchError(ValueError):
    """The model cannot be determined, or its sources disagree; one line for the user."""


def arch_differences(expected: LlamaArch, actual: LlamaArch) -> list:
    """Human-readable differences in the fields that matter ("hidden_size 4096 vs 64")."""
    diffs = [f"{f} {getattr(expected, f)} vs {getattr(actual, f)}" for f in COMPARED_FIELDS
             if getattr(expected, f) != getattr(actual, f)]
    e_rope = (expected.rope_scaling or {}).get("rope_type")
    a_rope = (actual.rope_scaling or {}).get("rope_type")
    if e_rope != a_rope:
        diffs.append(f"rope scaling {e_rope} vs {a_rope}")
    return diffs


def config_json_near(path: Optional[str]) -> Optional[str]:
    """The config.json describing ``path``: the file itself, ``path/config.json``, or (for a
    checkpoint's iteration folder or rank folder) the one in a folder above it."""
    if not path:
        return None
    if os.path.isfile(path):
        return path if path.endswith(".json") else None
    d = os.path.normpath(path)
    for _ in range(3):  # <root>/iter_N/mp_rank_XX -> <root>
        cand = os.path.join(d, "config.json")
        if os.path.isfile(cand):
            return cand
        d = os.path.dirname(d)
    return None


def read_hf_config(path: str, generation: Optional[str] = None) -> LlamaArch:
    """LlamaArch from a config.json, every failure one line naming the file."""
    try:
        return LlamaArch.from_hf_config(path, generation=generation)
    except json.JSONDecodeError as e:
        raise ArchError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except KeyError as e:
        raise ArchError(f"{path}: missing key {e.args[0]!r} (not a Llama config.json?)") from None
    except (TypeError, ValueError) as e:
        raise ArchError(f"{path}: {e}") from None
    except OSError as e:
        raise ArchError(f"{path}: cannot read ({e.strerror or e})") from None


def _preset(model_size: str, generation: Optional[str], size_name: str) -> LlamaArch:
    try:
        if generation is not None and "-" not in model_size:
            return get_preset(normalize_generation(generation), model_size)
        return get_preset(*parse_model_size(model_size))
    except ValueError as e:
        raise ArchError(f"{size_name}={model_size!r} is not valid: {e}") from None


def resolve_arch(model_size: Optional[str] = None, generation: Optional[str] = None,
                 hf_config: Optional[str] = None, checkpoint: Optional[str] = None,
                 size_name: str = "MODEL_SIZE") -> LlamaArch:
    """The LlamaArch from a size and/or a config.json (``hf_config``, else the one next to
    ``checkpoint``). ``model_size`` None or ``auto``: config.json decides everything."""
    cfg_path = config_json_near(hf_config) if hf_config else config_json_near(checkpoint)
    if hf_config and cfg_path is None:
        raise ArchError(f"{hf_config}: no config.json there")
    size = model_size if model_size not in (None, "", "auto") else None
    if size is None:
        if cfg_path is None:
            where = checkpoint or "the checkpoint"
            raise ArchError(f"{size_name}={model_size or 'auto'!r} is not valid: it reads "
                            f"config.json next to {where}, which has none; give a size")
        return read_hf_config(cfg_path, generation=generation)
    preset = _preset(size, generation, size_name)
    if cfg_path is None:
        return preset
    arch = read_hf_config(cfg_path, generation=preset.generation)
    diffs = arch_differences(preset, arch)
    if diffs:
        raise ArchError(f"{size_name}={model_size} disagrees with {cfg_path}: "
                        f"{'; '.join(diffs)} (preset vs config); use {size_name}=auto to take "
                        f"every shape from config.json")
    return arch
