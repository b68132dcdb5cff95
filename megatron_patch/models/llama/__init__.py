"""One Llama definition for LLaMA-1, Llama-2, Llama-3 and Llama-3.1."""
from .arch import LlamaArch
from .presets import get_preset, parse_model_size, normalize_generation, GENERATIONS, sizes

__all__ = ["LlamaArch", "get_preset", "parse_model_size", "normalize_generation",
           "GENERATIONS", "sizes", "ParallelSettings", "transformer_config"]


def __getattr__(name):
    # config imports megatron-core (seconds); tools that only need shapes skip it
    if name in ("ParallelSettings", "transformer_config"):
        from . import config
        return getattr(config, name)
    raise AttributeError(name)
