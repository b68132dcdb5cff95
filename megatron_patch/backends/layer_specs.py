"""Layer specs for the Llama decoder, per device backend.

local: megatron-core's local GPT layer (ColumnParallelLinear/RowParallelLinear, fused qkv,
gated MLP) with our RMSNorm and SDPA core attention -- no apex, no TE needed; with context
parallelism (CP>1) the core attention is ContextParallelAttention (K/V all-gathered over the
CP group).
te: megatron-core's Transformer Engine spec (fused norms into linear_qkv / linear_fc1; TE's
attention does CP itself, cp_comm_type from the TransformerConfig).
"""
from __future__ import annotations

import copy

from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_patch.transformer.cp_attention import ContextParallelAttention
from megatron_patch.transformer.norm import RMSNorm
from megatron_patch.transformer.sdpa_attention import SDPAttention


def _layers_here(config, vp_stage):
    # A block spec lists the layers of THIS pipeline stage (megatron builds len(layer_specs)).
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    return get_num_layers_to_build(config, vp_stage=vp_stage)


def local_block_spec(config, vp_stage=None, norm_cls=RMSNorm, attention_cls=SDPAttention):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if config.context_parallel_size > 1:
        # SDPA (and the NPU fused kernel) would see this rank's two chunks only
        attention_cls = ContextParallelAttention
    layer = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    sub = layer.submodules
    sub.input_layernorm = norm_cls
    sub.pre_mlp_layernorm = norm_cls
    sub.self_attention.submodules.core_attention = attention_cls
    return TransformerBlockSubmodules(layer_specs=[layer] * _layers_here(config, vp_stage),
                                      layer_norm=norm_cls)


def te_block_spec(config, vp_stage=None):
    from megatron.core.extensions.transformer_engine import TENorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    layer = get_gpt_layer_with_transformer_engine_spec()
    return TransformerBlockSubmodules(layer_specs=[layer] * _layers_here(config, vp_stage),
                                      layer_norm=TENorm)
