"""Presets against the published HF config.json numbers (written out here independently)."""
import pytest

from megatron_patch.models.llama import get_preset, parse_model_size, sizes

# generation, size: hidden, layers, heads, kv, ffn, vocab, ctx, theta, eps
PUBLISHED = {
    ("llama", "7B"): (4096, 32, 32, 32, 11008, 32000, 2048, 10000.0, 1e-6),
    ("llama", "13B"): (5120, 40, 40, 40, 13824, 32000, 2048, 10000.0, 1e-6),
    ("llama", "33B"): (6656, 60, 52, 52, 17920, 32000, 2048, 10000.0, 1e-6),
    ("llama", "65B"): (8192, 80, 64, 64, 22016, 32000, 2048, 10000.0, 1e-6),
    ("llama2", "7B"): (4096, 32, 32, 32, 11008, 32000, 4096, 10000.0, 1e-5),
    ("llama2", "13B"): (5120, 40, 40, 40, 13824, 32000, 4096, 10000.0, 1e-5),
    ("llama2", "70B"): (8192, 80, 64, 8, 28672, 32000, 4096, 10000.0, 1e-5),
    ("llama3", "8B"): (4096, 32, 32, 8, 14336, 128256, 8192, 500000.0, 1e-5),
    ("llama3", "70B"): (8192, 80, 64, 8, 28672, 128256, 8192, 500000.0, 1e-5),
    ("llama3_1", "8B"): (4096, 32, 32, 8, 14336, 128256, 131072, 500000.0, 1e-5),
    ("llama3_1", "70B"): (8192, 80, 64, 8, 28672, 128256, 131072, 500000.0, 1e-5),
    ("llama3_1", "405B"): (16384, 126, 128, 8, 53248, 128256, 131072, 500000.0, 1e-5),
}
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("key", sorted(PUBLISHED))
def test_published_sizes(key):
    a = get_preset(*key)
    got = (a.hidden_size, a.num_layers, a.num_attention_heads, a.num_key_value_heads,
           a.ffn_hidden_size, a.vocab_size, a.max_position_embeddings, a.rope_theta, a.norm_eps)
    assert got == PUBLISHED[key]
    assert a.head_dim == 128
    assert a.tie_word_embeddings is False
    if key[0] == "llama3_1":
        assert a.rope_scaling == LLAMA31_SCALING
    else:
        assert a.rope_scaling is None


def test_every_size_listed_and_tiny_exists():
    for gen in ("llama", "llama2", "llama3", "llama3_1"):
        assert set(sizes(gen)) == {s for g, s in PUBLISHED if g == gen} | {"tiny"}
        tiny = get_preset(gen, "tiny")
        params = tiny.vocab_size * tiny.hidden_size * 2 + tiny.num_layers * (
            4 * tiny.hidden_size ** 2 + 3 * tiny.hidden_size * tiny.ffn_hidden_size)
        assert params < 40e6


def test_parse_model_size_and_errors():
    assert parse_model_size("llama2-13B") == ("llama2", "13B")
    assert parse_model_size("llama3.1-8B") == ("llama3_1", "8B")
    assert parse_model_size("llama-65B") == ("llama", "65B")
    with pytest.raises(ValueError, match="choose one of"):
        get_preset("llama2", "8B")
    with pytest.raises(ValueError, match="generation"):
        get_preset("mistral", "7B")
