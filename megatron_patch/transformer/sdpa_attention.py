"""Core attention for megatron-core's local layer spec built on
``torch.nn.functional.scaled_dot_product_attention``.

megatron-core's own local ``DotProductAttention`` materialises the full score matrix and
wants apex's fused softmax kernels on GPU; SDPA picks flash/cuDNN/efficient kernels on CUDA
and a fused math path on CPU. Same interface: q [sq, b, np, hn], k/v [sk, b, ng, hn] ->
[sq, b, np * hn].

Packed sequences (``packed_seq_params``, THD: q [t, np, hn], k/v [t, ng, hn] -> [t, np * hn],
megatron-core's layout for packed SFT): causal attention within each segment of
``cu_seqlens``, never across. On CUDA in bf16/fp16 through torch's variable-length flash
kernel when this torch has it (``torch.nn.attention.varlen``); otherwise one causal SDPA
call per segment -- flash kernels per segment on CUDA, torch's CPU flash kernel on CPU, so
memory stays linear in the packed length either way (no [t, t] mask).

Grouped-query attention: SDPA's ``enable_gqa`` shares K/V heads across their query group
without copying them (CPU flash kernel and CUDA flash); with an explicit mask K/V are still
repeated, since not every masked kernel takes grouped heads.
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

# torch >= 2.5: scaled_dot_product_attention(..., enable_gqa=True)
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _varlen_attn():
    """torch's variable-length flash attention with the keywords used here, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    import inspect
    try:
        params = inspect.signature(varlen_attn).parameters
    except (TypeError, ValueError):
        return None
    return varlen_attn if {"scale", "window_size", "enable_gqa"} <= set(params) else None


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
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPAttention")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params, causal)
        sq, b = query.shape[0], query.shape[1]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        if attention_mask is not None:
            # an explicit mask (padding) is honoured for every mask type
            mask = ~attention_mask.bool()  # megatron: True = masked out; SDPA: True = keep
        if causal and (mask is not None or q.shape[2] != k.shape[2]):
            # is_causal cannot combine with a mask, and with a KV cache the sq queries are
            # the last positions: spell the causal part out (bottom-right aligned)
            sk = k.shape[2]
            keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            mask = keep if mask is None else mask & keep
            causal = False
        out = self._sdpa(q, k, v, mask, causal)
        # [b, h, s, d] -> [s, b, h * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)

    def _sdpa(self, q, k, v, mask, causal):
        """SDPA on [b, h, s, d]; K/V with num_groups heads."""
        gqa = self.num_groups != self.num_heads
        if gqa and (mask is not None or not _SDPA_GQA):  # heads of a group are contiguous
            rep = self.num_heads // self.num_groups
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            gqa = False
        kwargs = dict(attn_mask=mask, is_causal=causal, scale=self.softmax_scale)
        if gqa:
            kwargs["enable_gqa"] = True
        p = self.dropout_p if self.training else 0.0
        if p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p, **kwargs)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    def _packed(self, query, key, value, params, causal):
        """THD: q [t, np, hn], k/v [t, ng, hn] -> [t, np * hn], attention inside each
        segment of cu_seqlens only."""
        if params.qkv_format != "thd":
            raise NotImplementedError(f"packed sequences in {params.qkv_format!r} format: "
                                      "SDPAttention takes THD")
        cu = params.cu_seqlens_q
        if params.cu_seqlens_kv is not None and params.cu_seqlens_kv is not cu and \
                not torch.equal(params.cu_seqlens_kv, cu):
            raise NotImplementedError("packed cross-attention (cu_seqlens_q != cu_seqlens_kv)")
        if params.cu_seqlens_q_padded is not None and \
                not torch.equal(params.cu_seqlens_q_padded, cu):
            raise NotImplementedError("padded THD segments (cu_seqlens_q_padded)")
        t = query.shape[0]
        varlen = _varlen_attn() if query.is_cuda and query.dtype in (
            torch.float16, torch.bfloat16) and not (self.training and self.dropout_p) else None
        if varlen is not None:
            out = varlen(query, key, value, cu, cu, params.max_seqlen_q, params.max_seqlen_kv,
                         scale=self.softmax_scale, window_size=(-1, 0 if causal else -1),
                         enable_gqa=self.num_groups != self.num_heads)
            return out.reshape(t, self.num_heads * self.head_dim)
        bounds = cu.tolist()
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            # [L, h, d] -> [1, h, L, d]
            q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
            outs.append(self._sdpa(q, k, v, None, causal)[0].transpose(0, 1))
        return torch.cat(outs).reshape(t, self.num_heads * self.head_dim)
