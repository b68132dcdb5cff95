"""Small deterministic Llama models shared by tests: an HF model and its architecture."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_patch.models.llama import LlamaArch, get_preset


def small_arch(vocab_size: int = 500, layers: int = 4, kv: int = 2, tie: bool = False,
               generation: str = "llama3") -> LlamaArch:
    """Divisible by TP/PP up to 2 (and 4 for heads/layers); vocab not a multiple of 128."""
    base = get_preset(generation, "tiny")
    return LlamaArch(hidden_size=64, num_layers=layers, num_attention_heads=4,
                     num_key_value_heads=kv, ffn_hidden_size=128, vocab_size=vocab_size,
                     max_position_embeddings=base.max_position_embeddings,
                     rope_theta=base.rope_theta, norm_eps=base.norm_eps,
                     rope_scaling=base.rope_scaling, tie_word_embeddings=tie,
                     generation=generation)


def hf_model(arch: LlamaArch, seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    cfg = LlamaConfig(**{k: v for k, v in arch.to_hf_config().items() if k != "architectures"})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    # HF's init leaves norms at 1.0: perturb them so a misplaced norm weight is caught
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def token_batch(vocab: int, n: int, seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq + 1), generator=g)
