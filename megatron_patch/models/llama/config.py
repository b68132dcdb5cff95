"""LlamaArch + parallel/precision settings -> megatron.core TransformerConfig."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from .arch import LlamaArch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ParallelSettings:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    vp: Optional[int] = None  # virtual pipeline stages per rank
    pp0_layers: Optional[int] = None  # layers on the first pipeline stage (uneven split)


def transformer_config(arch: LlamaArch, par: ParallelSettings = ParallelSettings(),
                       precision: str = "fp32", recompute: Optional[str] = None,
                       recompute_num_layers: int = 1, use_cpu_initialization: bool = True,
                       **overrides) -> TransformerConfig:
    if precision not in DTYPES:
        raise ValueError(f"precision {precision!r}: choose fp32, bf16 or fp16")
    dtype = DTYPES[precision]
    if par.sequence_parallel and par.tp == 1:
        raise ValueError("sequence parallel needs tensor parallel size > 1")
    if arch.num_key_value_heads % par.tp:
        raise ValueError(f"TP={par.tp} does not divide num_key_value_heads="
                         f"{arch.num_key_value_heads}")
    kw = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_key_value_heads,
        ffn_hidden_size=arch.ffn_hidden_size, kv_channels=arch.head_dim,
        normalization="RMSNorm", layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        tensor_model_parallel_size=par.tp, pipeline_model_parallel_size=par.pp,
        context_parallel_size=par.cp, sequence_parallel=par.sequence_parallel,
        virtual_pipeline_model_parallel_size=par.vp,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=precision == "bf16",
        fp16=precision == "fp16", use_cpu_initialization=use_cpu_initialization,
        deallocate_pipeline_outputs=True,
    )
    if par.pp0_layers is not None and par.pp > 1:
        kw["num_layers_in_first_pipeline_stage"] = par.pp0_layers
    if recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform",
                  recompute_num_layers=recompute_num_layers)
    elif recompute == "sel":
        kw.update(recompute_granularity="selective")
    elif recompute not in (None, "false"):
        raise ValueError(f"activation checkpointing {recompute!r}: choose sel, full or false")
    kw.update(overrides)
    return TransformerConfig(**kw)
