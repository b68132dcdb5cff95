"""LlamaArch from HF config.json (both rope layouts), vocab padding, rope frequencies."""
import json

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megatron_patch.models.llama import LlamaArch, get_preset
from megatron_patch.models.llama.config import ParallelSettings, transformer_config
from megatron_patch.models.llama import rope

META_31_8B = {  # the published meta-llama/Llama-3.1-8B config.json (transformers 4.x keys)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256}


def test_meta_config_equals_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(META_31_8B))
    a = LlamaArch.from_hf_config(str(tmp_path))
    p = get_preset("llama3_1", "8B")
    for f in ("hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads",
              "ffn_hidden_size", "vocab_size", "max_position_embeddings", "rope_theta",
              "norm_eps", "rope_scaling", "head_dim", "tie_word_embeddings"):
        assert getattr(a, f) == getattr(p, f), f
    assert a.generation == "llama3_1"


def test_transformers5_rope_parameters_roundtrip():
    cfg = LlamaConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, intermediate_size=200, vocab_size=1000,
                      head_dim=32, tie_word_embeddings=True, rms_norm_eps=1e-6,
                      max_position_embeddings=4096,
                      rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 2.0,
                                    "high_freq_factor": 8.0,
                                    "original_max_position_embeddings": 1024},
                      rope_theta=123456.0)
    d = cfg.to_dict()
    a = LlamaArch.from_hf_config(d)
    assert (a.head_dim, a.num_key_value_heads, a.tie_word_embeddings, a.norm_eps) == (32, 2, True, 1e-6)
    assert a.rope_theta == 123456.0
    assert a.rope_scaling["factor"] == 16.0 and a.rope_scaling["original_max_position_embeddings"] == 1024
    # our frequencies equal transformers' for this config
    ours = rope.inv_freq(a)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**a.to_hf_config()), "cpu")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    again = LlamaArch.from_hf_config(a.to_hf_config())
    assert again.to_dict() == a.to_dict() | {"extra": again.extra}


@pytest.mark.parametrize("gen", ["llama", "llama2", "llama3", "llama3_1"])
def test_inv_freq_matches_transformers(gen):
    a = get_preset(gen, "8B" if gen.startswith("llama3") else "7B")
    kind = "llama3" if a.rope_scaling else "default"
    theirs, _ = ROPE_INIT_FUNCTIONS[kind](LlamaConfig(**a.to_hf_config()), "cpu") \
        if kind != "default" else (None, None)
    if theirs is None:
        dim = a.head_dim
        theirs = 1.0 / (a.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    torch.testing.assert_close(rope.inv_freq(a), theirs, rtol=0, atol=0)


def test_vocab_padding_like_megatron():
    a = get_preset("llama3_1", "8B")
    assert a.padded_vocab_size(1) == 128256  # already a multiple of 128
    assert a.padded_vocab_size(8) == 129024  # multiple of 1024
    b = get_preset("llama2", "7B")
    assert b.padded_vocab_size(1) == 32000 and b.padded_vocab_size(4) == 32256


def test_bad_configs_fail_clearly():
    with pytest.raises(ValueError, match="not a Llama"):
        LlamaArch.from_hf_config({"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        LlamaArch.from_hf_config(dict(META_31_8B, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="TP=3"):
        transformer_config(get_preset("llama3", "8B"), ParallelSettings(tp=3))


def test_linear_rope_scaling_matches_transformers():
    """rope_type linear (position interpolation) divides every frequency by the factor, as
    transformers computes it from the same config."""
    a = LlamaArch.from_hf_config(dict(META_31_8B, rope_scaling={"rope_type": "linear",
                                                                 "factor": 4.0}))
    theirs, _ = ROPE_INIT_FUNCTIONS["linear"](LlamaConfig(**a.to_hf_config()), "cpu")
    torch.testing.assert_close(rope.inv_freq(a), theirs, rtol=0, atol=0)
    unscaled = rope.inv_freq(LlamaArch.from_hf_config(dict(META_31_8B, rope_scaling=None)))
    assert torch.all(theirs < unscaled)  # the comparison can tell scaled from unscaled
