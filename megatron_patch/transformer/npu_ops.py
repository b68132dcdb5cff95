"""Ascend fused-op replacements used by the npu backend (megatron-core 0.16.1 local spec).

Each function calls one torch_npu kernel the way MindSpeed wires them:
``npu_rms_norm(x, gamma, epsilon)[0]``, ``npu_rotary_mul(x, cos, sin)``,
``npu_swiglu(x, dim=-1)`` and ``npu_fusion_attention(..., input_layout="SBH")[0]``.
torch_npu is imported when a kernel is first called, never at import, so this module loads
(and the registry can be applied and removed) on machines without Ascend software.
"""
from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType

from megatron_patch.transformer.sdpa_attention import SDPAttention

# npu_fusion_attention's causal sparse modes take this compressed mask instead of an
# [sq, sk] one: 2048x2048 bool, True above the diagonal (= masked).
COMPRESSED_MASK_SIZE = 2048
NO_LIMIT = 2147483647  # the kernel's default pre/next_tockens: no band


def _torch_npu():
    import torch_npu
    return torch_npu


# --- RMSNorm -------------------------------------------------------------------------------

def rmsnorm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Replaces megatron_patch.transformer.norm.RMSNorm.forward."""
    weight = self.weight
    if weight.dtype != x.dtype:  # the kernel wants gamma in the input's dtype
        weight = weight.to(x.dtype)
    return _torch_npu().npu_rms_norm(x, weight, epsilon=self.eps)[0]


# --- rotary --------------------------------------------------------------------------------

def fused_rotary_bshd(original):
    """Wrapper for rope_utils._apply_rotary_pos_emb_bshd: non-interleaved 4-D rope goes to
    npu_rotary_mul (half mode); interleaved / multi-latent layouts keep the original."""

    def apply(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        if rotary_interleaved or multi_latent_attention or t.dim() != 4 or freqs.dim() != 4:
            return original(t, freqs, rotary_interleaved=rotary_interleaved,
                            multi_latent_attention=multi_latent_attention, mscale=mscale)
        rot_dim = freqs.shape[-1]
        cos = (torch.cos(freqs) * mscale).to(t.dtype)
        sin = (torch.sin(freqs) * mscale).to(t.dtype)
        if rot_dim == t.shape[-1]:
            return _torch_npu().npu_rotary_mul(t, cos, sin)
        t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]  # partial rotary
        return torch.cat((_torch_npu().npu_rotary_mul(t_rot.contiguous(), cos, sin), t_pass),
                         dim=-1)

    apply.__wrapped__ = original
    return apply


# --- gated MLP -----------------------------------------------------------------------------

def bias_swiglu(input, bias, fp8_input_store=False, cpu_offload_input=False):
    """Replaces megatron.core.transformer.mlp.bias_swiglu_impl: silu(first half) * second half
    of fc1's output, in one kernel (which keeps its own input for backward)."""
    if fp8_input_store:
        raise NotImplementedError("fp8_input_store is not supported with npu_swiglu")
    if bias is not None:
        input = input + bias
    return _torch_npu().npu_swiglu(input.contiguous(), dim=-1)


# --- core attention ------------------------------------------------------------------------

_compressed_masks: dict = {}


def compressed_causal_mask(device) -> torch.Tensor:
    key = str(device)
    if key not in _compressed_masks:
        n = COMPRESSED_MASK_SIZE
        _compressed_masks[key] = torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)
    return _compressed_masks[key]


class NpuFusedAttention(SDPAttention):
    """Core attention on npu_fusion_attention in SBH layout (same interface as SDPAttention:
    q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np * hn]). GQA is native to the kernel:
    head_num counts query heads and K/V carry ng heads; query heads of a group are adjacent."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            # packed SFT (THD): SDPAttention's per-segment path (torch SDPA on the NPU);
            # npu_fusion_attention's TND layout with actual_seq_qlen is not wired yet
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by NpuFusedAttention")
        mask_type = attn_mask_type or self.attn_mask_type
        sq, b, sk = query.shape[0], query.shape[1], key.shape[0]
        q = query.reshape(sq, b, -1).contiguous()
        k = key.reshape(sk, b, -1).contiguous()
        v = value.reshape(sk, b, -1).contiguous()
        mask_kwargs = self._mask_kwargs(attention_mask, mask_type, sq, sk, query.device)
        p = self.dropout_p if self.training else 0.0

        def run():
            return _torch_npu().npu_fusion_attention(
                q, k, v, self.num_heads, input_layout="SBH", scale=self.softmax_scale,
                keep_prob=1.0 - p, **mask_kwargs)[0]

        if p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return run()
        return run()

    @staticmethod
    def _mask_kwargs(attention_mask, mask_type, sq, sk, device) -> dict:
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        if attention_mask is None or mask_type == AttnMaskType.causal:
            if not causal:
                return dict(atten_mask=None, sparse_mode=0, pre_tockens=NO_LIMIT,
                            next_tockens=NO_LIMIT)
            # 2 = causal from the top-left (training, sq == sk); 3 = from the bottom-right,
            # i.e. the last sq positions of a KV cache. Both read the compressed mask.
            return dict(atten_mask=compressed_causal_mask(device),
                        sparse_mode=2 if sq == sk else 3, pre_tockens=65536, next_tockens=0)
        # explicit mask (megatron and the kernel agree: True = masked), broadcast to B1SS
        mask = attention_mask.bool()
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.expand(mask.shape[0], 1, sq, sk)
        if causal:
            mask = mask | torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1)
        return dict(atten_mask=mask.contiguous(), sparse_mode=0, pre_tockens=NO_LIMIT,
                    next_tockens=NO_LIMIT)


# --- RNG -----------------------------------------------------------------------------------

def get_rng_state(device="cuda", clone=False, graph_safe=False):
    """Replaces tensor_parallel.random._get_cuda_rng_state: the NPU generator's state."""
    return torch.npu.get_rng_state()


def set_rng_state(new_state, device=-1, graph_safe=False):
    """Replaces tensor_parallel.random._set_cuda_rng_state: megatron bound torch.cuda's
    _lazy_call at import, which on an NPU machine queues the call forever."""
    torch.npu.set_rng_state(new_state)
