"""The megatron_patch model, loaded through the mapping table, gives transformers'
LlamaForCausalLM logits on >= 64 tokens, for every generation's tiny preset (fp32)."""
import pytest
import torch

from llama_fixtures import hf_model
from megatron_patch.models.llama import mapping
from megatron_patch.models.llama import get_preset
from megatron_patch.models.llama.config import transformer_config
from megatron_patch.models.llama.provider import build_llama

TOL = 1e-4


def _max_diff(arch, seq, batch=2):
    hf = hf_model(arch)
    model = build_llama(arch, transformer_config(arch)).eval()
    sd = mapping.to_local_names(mapping.hf_to_mcore_state(hf.state_dict(), arch))
    model.load_state_dict(sd, strict=True)
    ids = torch.randint(0, arch.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids, torch.arange(seq).expand(batch, -1), None)
    assert out.shape[-1] == arch.padded_vocab_size(1)
    assert torch.all(out[..., arch.vocab_size:] == 0)
    return (out[..., : arch.vocab_size] - ref).abs().max().item(), ref.abs().max().item()


@pytest.mark.parametrize("gen", ["llama", "llama2", "llama3", "llama3_1"])
def test_tiny_preset_logits_match_hf(mp1, gen):
    arch = get_preset(gen, "tiny")
    seq = 160 if gen == "llama3_1" else 64
    if gen == "llama3_1":  # the positions past the original context are where scaling acts
        assert seq > arch.rope_scaling["original_max_position_embeddings"]
    diff, scale = _max_diff(arch, seq)
    print(f"{gen}: max |logit diff| = {diff:.3e} (logits up to {scale:.2f})")
    assert diff <= TOL and scale > 0.1


def test_tied_embeddings_head_dim_and_odd_vocab(mp1):
    arch = get_preset("llama3", "tiny")
    arch.tie_word_embeddings = True
    arch.vocab_size = 1001
    arch.head_dim = 48  # != hidden/heads
    diff, _ = _max_diff(arch, 80)
    assert diff <= TOL


def test_a_wrong_mapping_is_detected(mp1):
    """Guard: the comparison is sensitive (swapping q/k groups changes the logits)."""
    arch = get_preset("llama3", "tiny")
    hf = hf_model(arch)
    sd = mapping.hf_to_mcore_state(hf.state_dict(), arch)
    w = sd["decoder.layers.0.self_attention.linear_qkv.weight"]
    sd["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.cat(w.chunk(2)[::-1])
    model = build_llama(arch, transformer_config(arch)).eval()
    model.load_state_dict(mapping.to_local_names(sd))
    ids = torch.randint(0, arch.vocab_size, (1, 64))
    with torch.no_grad():
        diff = (model(ids, torch.arange(64)[None], None)[..., : arch.vocab_size] - hf(ids).logits).abs().max()
    assert diff > 1e-3
