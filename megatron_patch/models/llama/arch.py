"""LlamaArch: the architecture numbers of one Llama model, read from a preset or HF config.json."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class LlamaArch:
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    tie_word_embeddings: bool = False
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    generation: str = "llama3_1"
    initializer_range: float = 0.02
    extra: dict = field(default_factory=dict, repr=False)  # HF fields we only carry through

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("hidden_size is not a multiple of num_attention_heads; "
                                 "config.json must give head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1, divisible_by: int = 128) -> int:
        """Megatron's --make-vocab-size-divisible-by padding: multiple of divisible_by * TP."""
        multiple = divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    # ---- HF config.json ---------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict | str, generation: Optional[str] = None) -> "LlamaArch":
        if isinstance(cfg, (str, os.PathLike)):
            path = os.path.join(cfg, "config.json") if os.path.isdir(cfg) else cfg
            with open(path) as f:
                cfg = json.load(f)
        if not isinstance(cfg, dict):
            raise ValueError(f"expected a JSON object of model settings, found a "
                             f"{type(cfg).__name__}")
        _check_numbers(cfg)
        arch = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in arch:
            raise ValueError(f"not a Llama config (model_type={cfg.get('model_type')!r}, "
                             f"architectures={arch})")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("attention_bias/mlp_bias Llama variants are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (Llama uses silu)")
        theta, scaling = _rope_from_hf(cfg)
        heads = cfg["num_attention_heads"]
        ctx = cfg.get("max_position_embeddings", 2048)
        if generation is None:
            generation = _guess_generation(cfg, scaling)
        known = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta",
                 "rms_norm_eps", "rope_scaling", "rope_parameters", "tie_word_embeddings",
                 "head_dim", "initializer_range"}
        return cls(
            hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            max_position_embeddings=ctx, rope_theta=float(theta),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=cfg.get("head_dim"), generation=generation,
            initializer_range=cfg.get("initializer_range", 0.02),
            extra={k: v for k, v in cfg.items() if k not in known},
        )

    def to_hf_config(self) -> dict:
        """A config.json for transformers' LlamaForCausalLM (pre-5 style keys, read by all)."""
        cfg = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.ffn_hidden_size, "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.norm_eps,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings, "head_dim": self.head_dim,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "initializer_range": self.initializer_range,
        }
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype"):
            if k in self.extra:
                cfg[k] = self.extra[k]
        cfg.setdefault("bos_token_id", 128000 if self.vocab_size >= 128000 else 1)
        cfg.setdefault("eos_token_id", 128001 if self.vocab_size >= 128000 else 2)
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


# config.json fields that must be whole numbers >= 1 (a string such as "four" would
# otherwise fail deep inside with a message that does not name the field)
_POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size", "vocab_size",
                  "max_position_embeddings", "head_dim")


def _check_numbers(cfg: dict) -> None:
    for key in _POSITIVE_INTS:
        v = cfg.get(key)  # absent: optional, or reported as a missing key by the caller
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{key}={v!r}: must be a whole number >= 1")
    for key in ("rope_theta", "rms_norm_eps"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise ValueError(f"{key}={v!r}: must be a positive number")


def _rope_from_hf(cfg: dict) -> tuple[float, Optional[dict]]:
    """(theta, scaling) from rope_theta/rope_scaling (transformers <5, Meta's files) or
    transformers-5 ``rope_parameters``."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", params.get("type", "default")) != "default":
            scaling = params
    if theta is None:
        theta = 10000.0
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        rtype = scaling.pop("type", None) or scaling.get("rope_type")
        scaling["rope_type"] = rtype
        if rtype == "default":
            scaling = None
        elif rtype not in ("llama3", "linear"):
            raise ValueError(f"rope scaling type {rtype!r} is not supported (llama3, linear)")
    return theta, scaling or None


def _guess_generation(cfg: dict, scaling) -> str:
    if scaling and scaling.get("rope_type") == "llama3":
        return "llama3_1"
    if cfg.get("vocab_size", 0) >= 128000:
        return "llama3"
    if cfg.get("max_position_embeddings", 2048) >= 4096 or cfg.get("rms_norm_eps") == 1e-5:
        return "llama2"
    return "llama"
