"""Context-parallel core attention (CP > 1) for megatron-core's local layer spec, without
Transformer Engine (megatron-core's own ``DotProductAttention`` asserts CP == 1).

Layout (megatron's, ``megatron.core.utils.get_batch_on_this_cp_rank``): a sequence of S
tokens is cut into 2*CP chunks of c = S / (2*CP) tokens; CP rank r holds chunks r and
2*CP-1-r, in that order, so every rank has the same causal work. Per layer, each rank

1. all-gathers K and V over the CP group in one collective -- the ng key/value heads of
   GQA, not the np query heads -- with megatron's ``gather_from_sequence_parallel_region``,
   whose backward reduce-scatters: every rank gets the K/V gradients that all ranks'
   queries produced for its own tokens;
2. puts the gathered chunks in sequence order;
3. lets its query chunk i (positions [i*c, (i+1)*c)) attend to keys [0, (i+1)*c), causal
   on the last c keys: a causal mask aligned to the lower right.

Same interface as ``SDPAttention``: q [sq, b, np, hn], k/v [sq, b, ng, hn] -> [sq, b, np*hn].

The lower-right causal attention of step 3, per device:
- CPU: torch's CPU flash kernel exposes the log-sum-exp. The prefix keys [0, i*c) (no mask)
  and the diagonal block (a square causal block) are two kernel calls merged by their
  log-sum-exp; the backward runs the kernel's backward on each block with the merged output
  and log-sum-exp (what ring attention does). An explicit [c, (i+1)*c] mask would instead be
  materialised and kept for the backward in every layer: O(S^2/CP) memory, more than
  context parallelism saves on a narrow model.
- elsewhere: ``scaled_dot_product_attention`` with torch's ``causal_lower_right`` bias,
  which CUDA's flash / memory-efficient kernels run without a mask.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


def chunk_order(cp_size: int) -> list:
    """Index of each sequence chunk in the all-gathered K/V (rank-major, two chunks per
    rank: rank r holds chunks r and 2*cp_size-1-r)."""
    where = {}
    for r in range(cp_size):
        where[r], where[2 * cp_size - 1 - r] = 2 * r, 2 * r + 1
    return [where[i] for i in range(2 * cp_size)]


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _PrefixCausalAttentionCPU(torch.autograd.Function):
    """softmax(q k^T * scale) v with q [b, np, c, d] at the LAST c positions of k/v
    [b, ng, p + c, d]: keys [0, p) fully visible, the last c keys causal. Exact; memory
    O(c + p) per head (no mask)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix: int, scale: float):
        out, lse = _flash_cpu(q, k[:, :, prefix:], v[:, :, prefix:], 0.0, True, scale=scale)
        if prefix:
            out_p, lse_p = _flash_cpu(q, k[:, :, :prefix], v[:, :, :prefix], 0.0, False,
                                      scale=scale)
            merged = torch.logaddexp(lse_p, lse)
            out = (out_p.float() * torch.exp(lse_p - merged).unsqueeze(-1)
                   + out.float() * torch.exp(lse - merged).unsqueeze(-1)).to(q.dtype)
            lse = merged
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.prefix, ctx.scale = prefix, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        p, scale = ctx.prefix, ctx.scale
        dq, dk, dv = _flash_cpu_backward(grad_out, q, k[:, :, p:], v[:, :, p:], out, lse, 0.0,
                                         True, scale=scale)
        if p:
            dq_p, dk_p, dv_p = _flash_cpu_backward(grad_out, q, k[:, :, :p], v[:, :, :p], out,
                                                   lse, 0.0, False, scale=scale)
            dq = dq + dq_p
            dk, dv = torch.cat([dk_p, dk], dim=2), torch.cat([dv_p, dv], dim=2)
        return dq, dk, dv, None, None


def prefix_causal_attention(q, k, v, prefix: int, scale: float) -> torch.Tensor:
    """q [b, np, c, d] attends to k/v [b, ng, prefix + c, d] (GQA: np a multiple of ng,
    the query heads of a group adjacent): all of the first ``prefix`` keys, causally the
    last c."""
    if q.device.type == "cpu":
        # strided views are fine for the kernel: K/V stay one gathered buffer per layer
        return _PrefixCausalAttentionCPU.apply(q, k, v, prefix, scale)
    return lower_right_sdpa(q, k, v, scale)


def lower_right_sdpa(q, k, v, scale: float) -> torch.Tensor:
    """The same through SDPA's ``causal_lower_right`` bias (flash / memory-efficient kernels
    on CUDA; a materialised mask on devices without them)."""
    from torch.nn.attention.bias import causal_lower_right
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # after the gather: communication stays at ng heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), scale=scale)


class ContextParallelAttention(MegatronModule):
    """Causal self-attention over a sequence split across the context-parallel group
    (module docstring). Causal masks only; no explicit masks, packed sequences, KV cache or
    attention dropout under CP (each raises)."""

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(
                required_pgs=["tp", "cp"])
        self.cp_group = getattr(pg_collection, "cp", None) or \
            parallel_state.get_context_parallel_group()
        tp = pg_collection.tp.size()
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise NotImplementedError("attention dropout is not supported with context "
                                      "parallelism (CP>1) without Transformer Engine")
        if attention_type != "self" or attn_mask_type not in (AttnMaskType.causal,
                                                              AttnMaskType.padding_causal):
            raise NotImplementedError("context parallelism (CP>1) without Transformer Engine "
                                      "supports causal self-attention only")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.num_heads = divide(config.num_attention_heads, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_mask is not None \
                or attention_bias is not None:
            raise NotImplementedError(
                "context parallelism (CP>1) without Transformer Engine takes causal attention "
                "only: no packed sequences (MP_SFT_PACKING), explicit masks or biases")
        if key.shape[0] != query.shape[0]:
            raise NotImplementedError("context parallelism (CP>1) has no KV-cache inference")
        cp = self.cp_group.size()
        r = self.cp_group.rank()
        sq, b = query.shape[0], query.shape[1]
        c = sq // 2  # each rank holds two chunks of c tokens
        # one collective for K and V: [sq, b, 2*ng, hn] -> [cp*sq, b, 2*ng, hn], rank-major
        kv = gather_from_sequence_parallel_region(torch.cat([key, value], dim=2), True,
                                                  group=self.cp_group)
        order = torch.tensor(chunk_order(cp), device=kv.device)
        kv = kv.view(2 * cp, c, *kv.shape[1:]).index_select(0, order).flatten(0, 1)
        kv = kv.permute(1, 2, 0, 3)  # [b, 2*ng, S, hn], sequence order
        ng = key.shape[2]
        k_all, v_all = kv[:, :ng], kv[:, ng:]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        outs = []
        for half, chunk in enumerate((r, 2 * cp - 1 - r)):
            end = (chunk + 1) * c
            outs.append(prefix_causal_attention(
                q[:, :, half * c:(half + 1) * c], k_all[:, :, :end], v_all[:, :, :end],
                chunk * c, self.softmax_scale))
        out = torch.cat(outs, dim=2)  # [b, np, sq, hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)
