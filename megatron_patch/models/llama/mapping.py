"""The HF <-> megatron-core parameter mapping for Llama, as one table used by both directions.

Checkpoint files use megatron-core's Transformer Engine names (what Megatron-LM/Pai write):
input norm fused into ``linear_qkv.layer_norm_weight``, post-attention norm into
``linear_fc1.layer_norm_weight``. ``to_local_names`` renames for the local (non-TE) spec.

Fused layouts:
- linear_qkv: per query group g, ``[q heads of g (heads/groups rows of head_dim) | k_g | v_g]``.
- linear_fc1: ``cat(gate, up)``; a TP shard holds ``cat(gate_r, up_r)`` so halves stay paired.
- word embeddings / output layer: rows padded to the padded vocab (zeros), cut on export.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .arch import LlamaArch
from .parallel_layout import stage_layer_counts


@dataclass(frozen=True)
class Rule:
    mcore: str                 # megatron-core name; "{i}" = layer index
    hf: tuple                  # HF names it is made of
    kind: str                  # copy | qkv | gate_up | vocab
    tp_dim: Optional[int]      # None: replicated; 0: column-parallel; 1: row-parallel
    stage: str = "layer"       # first | layer | last

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.mcore


_L = "model.layers.{i}."
_M = "decoder.layers.{i}."
RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0, "first"),
    Rule(_M + "self_attention.linear_qkv.layer_norm_weight", (_L + "input_layernorm.weight",), "copy", None),
    Rule(_M + "self_attention.linear_qkv.weight",
         (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
         "qkv", 0),
    Rule(_M + "self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), "copy", 1),
    Rule(_M + "mlp.linear_fc1.layer_norm_weight", (_L + "post_attention_layernorm.weight",), "copy", None),
    Rule(_M + "mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
         "gate_up", 0),
    Rule(_M + "mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), "copy", 1),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", None, "last"),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", 0, "last"),
)

# TE (file) name suffix -> local-spec name suffix
_LOCAL = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
          "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def rules_for(arch: LlamaArch):
    """Rules that apply to this model (tied embeddings have no output_layer / lm_head)."""
    return [r for r in RULES if not (r.mcore == "output_layer.weight" and arch.tie_word_embeddings)]


def to_local_names(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for te, local in _LOCAL.items():
            if k.endswith(te):
                k = k[: -len(te)] + local
                break
        out[k] = v
    return out


def to_te_names(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for te, local in _LOCAL.items():
            if k.endswith(local) and k.startswith("decoder.layers."):
                k = k[: -len(local)] + te
                break
        out[k] = v
    return out


# ---- whole (unsharded) tensors ----------------------------------------------------------
def pack(rule: Rule, hf: Sequence[torch.Tensor], arch: LlamaArch, padded_vocab: int) -> torch.Tensor:
    """HF tensors -> the full megatron-core tensor."""
    if rule.kind == "copy":
        return hf[0]
    if rule.kind == "vocab":
        w = hf[0]
        if padded_vocab > w.shape[0]:
            w = torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], w.shape[1])])
        return w
    if rule.kind == "gate_up":
        return torch.cat(hf, dim=0)
    if rule.kind == "qkv":
        q, k, v = hf
        g, d = arch.num_key_value_heads, arch.head_dim
        r = arch.num_attention_heads // g
        h = q.shape[1]
        return torch.cat([q.view(g, r * d, h), k.view(g, d, h), v.view(g, d, h)], dim=1).reshape(-1, h)
    raise ValueError(rule.kind)


def unpack(rule: Rule, w: torch.Tensor, arch: LlamaArch) -> list:
    """The full megatron-core tensor -> HF tensors (inverse of pack)."""
    if rule.kind == "copy":
        return [w]
    if rule.kind == "vocab":
        return [w[: arch.vocab_size]]
    if rule.kind == "gate_up":
        return list(w.chunk(2, dim=0))
    if rule.kind == "qkv":
        g, d = arch.num_key_value_heads, arch.head_dim
        r = arch.num_attention_heads // g
        h = w.shape[1]
        q, k, v = w.view(g, (r + 2) * d, h).split([r * d, d, d], dim=1)
        return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]
    raise ValueError(rule.kind)


# ---- tensor parallel ------------------------------------------------------------------
def shard(rule: Rule, w: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """The slice of a full megatron-core tensor that TP rank ``rank`` holds."""
    if rule.tp_dim is None or tp == 1:
        return w
    if rule.kind == "gate_up":
        gate, up = w.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]], dim=0)
    # qkv: groups are contiguous blocks along dim 0, so a plain split keeps them whole
    return w.chunk(tp, dim=rule.tp_dim)[rank]


def merge(rule: Rule, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of shard over all TP ranks."""
    if rule.tp_dim is None or len(shards) == 1:
        return shards[0]
    if rule.kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(shards), dim=rule.tp_dim)


# ---- pipeline parallel ------------------------------------------------------------------
def stage_layers(num_layers: int, pp: int, pp_rank: int, vp: Optional[int] = None,
                 vp_stage: int = 0, pp0_layers: Optional[int] = None) -> list:
    """Global layer indices held by (pp_rank, vp_stage), as megatron-core places them:
    chunk ``vp_stage * PP + pp_rank`` in pipeline order (LayoutError when they do not split)."""
    counts = stage_layer_counts(num_layers, pp, vp, pp0_layers if pp > 1 else None)
    idx = vp_stage * pp + pp_rank
    start = sum(counts[:idx])
    return list(range(start, start + counts[idx]))


def mcore_names(rule: Rule, layers: Sequence[int], first: bool, last: bool) -> list:
    """(mcore local name, global layer) pairs of ``rule`` on a stage; layer names use the
    stage-local index like megatron-core's state dict."""
    if rule.stage == "first":
        return [(rule.mcore, None)] if first else []
    if rule.stage == "last":
        return [(rule.mcore, None)] if last else []
    return [(rule.mcore.format(i=j), i) for j, i in enumerate(layers)]


def hf_names(rule: Rule, layer: Optional[int]) -> list:
    return [n.format(i=layer) for n in rule.hf]


def hf_to_mcore_state(hf_sd: dict, arch: LlamaArch, tp: int = 1, tp_rank: int = 0,
                      layers: Optional[Sequence[int]] = None, first: bool = True,
                      last: bool = True) -> dict:
    """In-memory conversion of a whole HF state dict to one (tp_rank, stage) mcore state dict
    (TE names). The streaming converter uses the same rules tensor by tensor."""
    layers = list(range(arch.num_layers)) if layers is None else list(layers)
    padded = arch.padded_vocab_size(tp)
    out = {}
    for rule in rules_for(arch):
        for name, layer in mcore_names(rule, layers, first, last):
            full = pack(rule, [hf_sd[n] for n in hf_names(rule, layer)], arch, padded)
            out[name] = shard(rule, full, tp, tp_rank).clone()
    return out


def stage_to_hf_state(tp_sds: Sequence[dict], arch: LlamaArch, layers: Sequence[int],
                      first: bool, last: bool) -> dict:
    """One pipeline stage (or virtual chunk): its TP shards (TE or local names) -> HF tensors."""
    tp_sds = [to_te_names(sd) for sd in tp_sds]
    out = {}
    for rule in rules_for(arch):
        for name, layer in mcore_names(rule, layers, first, last):
            full = merge(rule, [sd[name] for sd in tp_sds])
            for hf_name, t in zip(hf_names(rule, layer), unpack(rule, full, arch)):
                out[hf_name] = t.clone()
    return out


def hf_tensor_plan(arch: LlamaArch) -> list:
    """[(HF name, shape)] of every tensor of the HF model, in the order the rules produce
    them (embedding, layer 0 ... layer L-1, final norm, lm_head)."""
    h, d, ffn = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d
    shapes = {
        "model.embed_tokens.weight": (arch.vocab_size, h), "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h), "mlp.down_proj.weight": (h, ffn),
        "model.norm.weight": (h,), "lm_head.weight": (arch.vocab_size, h),
    }
    rules = rules_for(arch)
    plan = [(n, shapes[n]) for r in rules if r.stage == "first" for n in hf_names(r, None)]
    for i in range(arch.num_layers):
        plan += [(n, shapes[n.split(".", 3)[3]]) for r in rules if r.stage == "layer"
                 for n in hf_names(r, i)]
    plan += [(n, shapes[n]) for r in rules if r.stage == "last" for n in hf_names(r, None)]
    return plan
