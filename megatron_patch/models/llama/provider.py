"""Build the megatron-core GPTModel for a Llama architecture."""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from . import rope
from .arch import LlamaArch


class LlamaModel(GPTModel):
    """GPTModel whose loss ignores the vocabulary padding.

    Padded rows of the output layer (zeros after conversion) would otherwise add exp(0)
    terms to the softmax, so the loss would differ from HF's over the true vocabulary.
    """

    true_vocab_size: int = 0

    def compute_language_model_loss(self, labels, logits):
        v_local = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * v_local
        if start + v_local > self.true_vocab_size:
            pad = torch.arange(start, start + v_local, device=logits.device) >= self.true_vocab_size
            logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
        return super().compute_language_model_loss(labels, logits)


def build_llama(arch: LlamaArch, config: TransformerConfig, pre_process: Optional[bool] = None,
                post_process: Optional[bool] = None, vp_stage: Optional[int] = None,
                spec=None) -> GPTModel:
    """One model chunk. Parallel groups must be initialised (parallel_state)."""
    from megatron_patch.backends import active_backend

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if spec is None:
        spec = active_backend().block_spec(config, vp_stage)
    model = LlamaModel(
        config=config, transformer_layer_spec=spec,
        vocab_size=arch.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process, post_process=post_process, parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope", rotary_base=int(arch.rope_theta),
        vp_stage=vp_stage,
    )
    # megatron-core hard-codes Llama-3.1's scaling constants; use transformers' formula with
    # the config's own numbers (any factor / original context).
    model.true_vocab_size = arch.vocab_size
    rot = model.rotary_pos_emb
    rot.inv_freq = rope.inv_freq(arch).to(rot.inv_freq.device)
    return model
