"""One Llama definition for LLaMA-1, Llama-2, Llama-3 and Llama-3.1.

Shapes (``arch``, ``presets``, ``resolve``, ``parallel_layout``) import nothing heavy; the
megatron-core side is in ``config`` (TransformerConfig), ``provider`` (GPTModel), ``rope`` and
``mapping`` (the HF <-> megatron-core parameter layout) -- import those modules directly.
"""
from .arch import LlamaArch
from .presets import GENERATIONS, get_preset, normalize_generation, parse_model_size, sizes

__all__ = ["LlamaArch", "get_preset", "parse_model_size", "normalize_generation",
           "GENERATIONS", "sizes"]
