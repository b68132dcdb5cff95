"""One Llama definition for LLaMA-1, Llama-2, Llama-3 and Llama-3.1."""
from .arch import LlamaArch
from .presets import get_preset, parse_model_size, normalize_generation, GENERATIONS, sizes
from .config import ParallelSettings, transformer_config

__all__ = ["LlamaArch", "get_preset", "parse_model_size", "normalize_generation",
           "GENERATIONS", "sizes", "ParallelSettings", "transformer_config"]
