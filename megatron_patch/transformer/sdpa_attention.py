"""Core attention for megatron-core's local layer spec built on
``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's own local ``DotProductAttention`` materialises the full score matrix and
wants apex's fused softmax kernels on GPU; SDPA picks flash/cuDNN/efficient kernels on CUDA
and a fused math path on CPU. Same interface: q [sq, b, np, hn], k/v [sk, b, ng, hn] ->
[sq, b, np * hn].
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError(
                "SDPAttention sees one context-parallel rank's tokens only: with CP>1 use "
                "megatron_patch.transformer.cp_attention.ContextParallelAttention")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need Transformer Engine attention")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPAttention")
        mask_type = attn_mask_type or self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.num_groups != self.num_heads:  # GQA: heads of a group are contiguous
            rep = self.num_heads // self.num_groups
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        mask = None
        if attention_mask is not None:
            # an explicit mask (padding, or packed samples) is honoured for every mask type
            mask = ~attention_mask.bool()  # megatron: True = masked out; SDPA: True = keep
        if causal and (mask is not None or q.shape[2] != k.shape[2]):
            # is_causal cannot combine with a mask, and with a KV cache the sq queries are
            # the last positions: spell the causal part out (bottom-right aligned)
            sk = k.shape[2]
            keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            mask = keep if mask is None else mask & keep
            causal = False
        p = self.dropout_p if self.training else 0.0
        if p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                     is_causal=causal, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 scale=self.softmax_scale)
        # [b, h, s, d] -> [s, b, h * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)
