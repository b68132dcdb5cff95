"""Published shapes of every LLaMA-1, Llama-2, Llama-3 and Llama-3.1 size, plus tiny CPU sizes.

Numbers are those of the published HF ``config.json`` files (meta-llama/* and the LLaMA-1
conversions huggyllama/llama-*); tests/test_presets.py repeats them independently.
"""
from __future__ import annotations

from .arch import LlamaArch

GENERATIONS = ("llama", "llama2", "llama3", "llama3_1")

_LLAMA3_1_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _gen_defaults(generation: str) -> dict:
    if generation == "llama":
        return dict(vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0,
                    norm_eps=1e-6)
    if generation == "llama2":
        return dict(vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                    norm_eps=1e-5)
    if generation == "llama3":
        return dict(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                    norm_eps=1e-5)
    if generation == "llama3_1":
        return dict(vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                    norm_eps=1e-5, rope_scaling=dict(_LLAMA3_1_SCALING))
    raise KeyError(generation)


# (generation, size): hidden, layers, heads, kv heads, ffn
_SHAPES = {
    ("llama", "7B"): (4096, 32, 32, 32, 11008),
    ("llama", "13B"): (5120, 40, 40, 40, 13824),
    ("llama", "33B"): (6656, 60, 52, 52, 17920),
    ("llama", "65B"): (8192, 80, 64, 64, 22016),
    ("llama2", "7B"): (4096, 32, 32, 32, 11008),
    ("llama2", "13B"): (5120, 40, 40, 40, 13824),
    ("llama2", "70B"): (8192, 80, 64, 8, 28672),
    ("llama3", "8B"): (4096, 32, 32, 8, 14336),
    ("llama3", "70B"): (8192, 80, 64, 8, 28672),
    ("llama3_1", "8B"): (4096, 32, 32, 8, 14336),
    ("llama3_1", "70B"): (8192, 80, 64, 8, 28672),
    ("llama3_1", "405B"): (16384, 126, 128, 8, 53248),
    # tiny: a few million parameters (mostly the real-size vocabulary), for CPU runs and tests
    ("llama", "tiny"): (128, 4, 4, 4, 352),
    ("llama2", "tiny"): (128, 4, 4, 4, 352),
    ("llama3", "tiny"): (128, 4, 4, 2, 352),
    ("llama3_1", "tiny"): (128, 4, 4, 2, 352),
}

# Tiny Llama-3.1 keeps llama3 rope scaling but with a short original context so CPU tests
# exercise positions beyond it.
_TINY_OVERRIDES = {
    "llama": dict(max_position_embeddings=512),
    "llama2": dict(max_position_embeddings=512),
    "llama3": dict(max_position_embeddings=512),
    "llama3_1": dict(max_position_embeddings=512, rope_scaling=dict(
        _LLAMA3_1_SCALING, original_max_position_embeddings=64)),
}


def sizes(generation: str) -> list[str]:
    return [s for (g, s) in _SHAPES if g == generation]


def get_preset(generation: str, size: str) -> LlamaArch:
    """``get_preset('llama3_1', '8B')``. Raises ValueError naming the valid sizes."""
    generation = normalize_generation(generation)
    key = (generation, size if size == "tiny" else size.upper())
    if key not in _SHAPES:
        raise ValueError(f"unknown size {size!r} for {generation}; choose one of "
                         f"{', '.join(sizes(generation))}")
    hidden, layers, heads, kv, ffn = _SHAPES[key]
    fields = _gen_defaults(generation)
    if size == "tiny":
        fields.update(_TINY_OVERRIDES[generation])
    return LlamaArch(generation=generation, hidden_size=hidden, num_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv,
                     ffn_hidden_size=ffn, **fields)


_ALIASES = {"llama1": "llama", "llama-1": "llama", "llama-2": "llama2", "llama-3": "llama3",
            "llama3.1": "llama3_1", "llama-3.1": "llama3_1", "llama31": "llama3_1"}


def normalize_generation(name: str) -> str:
    g = _ALIASES.get(name.lower(), name.lower())
    if g not in GENERATIONS:
        raise ValueError(f"unknown Llama generation {name!r}; choose one of {', '.join(GENERATIONS)}")
    return g


def parse_model_size(spec: str) -> tuple[str, str]:
    """'llama2-13B' -> ('llama2', '13B'); 'llama3_1-tiny' -> ('llama3_1', 'tiny')."""
    if "-" not in spec:
        raise ValueError(f"model size {spec!r} must name the generation, e.g. llama3-8B")
    gen, size = spec.rsplit("-", 1)
    return normalize_generation(gen), size
