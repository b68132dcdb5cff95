"""CHECK in bounded memory: the parity check of check.py walked one point at a time.

Each side is a one-layer model of its own library -- transformers' ``LlamaModel`` with a
single decoder layer, fed ``inputs_embeds``, and megatron_patch's megatron-core model with a
single layer and neither embedding nor output layer, fed like a later pipeline stage --
whose layer weights are replaced for every layer. Both run the same token ids as the
whole-model check and each side carries its own output forward, so every row equals the
whole-model check's row (same modules, same inputs).

The two sides run one after the other, each dropping its layer's weights before the other
loads its own: the peak is one layer's weights and activations plus the hidden states being
carried. The vocabulary-sized tensors are never whole: the embedding output is the rows of
the table at the prompt's ids (what both embedding modules compute: a lookup, no scaling,
no dropout), gathered from blocks of rows; the logits are computed and compared a block of
vocabulary rows at a time (``h @ W[block].T``, the op of HF's ``lm_head`` and of megatron's
``ColumnParallelLinear`` at TP=1), accumulating the row's statistics (check.Stats).

Sampled layers (``layers=[...]``): each listed layer gets the same input on both sides, the
reference embedding output, and so do the final norm and logits: every listed layer's weights
are checked in isolation at the cost of two layer forwards each.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_patch.models.llama import mapping
from megatron_patch.models.llama.arch import LlamaArch

from . import check
from .weights import EMBEDDING, hf_output_name

# elements of one block of logits (block rows x sequence): bounds the float64 comparison
LOGIT_BLOCK_ELEMS = 1 << 24
MAX_BLOCK_ROWS = 8192
_LAYER_RULES = [r for r in mapping.RULES if r.stage == "layer"]


def _dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _row_blocks(n: int, block: int):
    for a in range(0, n, block):
        yield a, min(n, a + block)


def gather_rows(read_rows: Callable, vocab: int, ids: torch.Tensor, block: int) -> torch.Tensor:
    """table[ids] for a [b, s] id tensor, the table read a block of rows at a time."""
    flat = ids.reshape(-1)
    out = None
    for a, b in _row_blocks(vocab, block):
        sel = ((flat >= a) & (flat < b)).nonzero().view(-1)
        if not sel.numel():
            continue
        rows = read_rows(a, b)
        if out is None:
            out = rows.new_empty(flat.numel(), rows.shape[1])
        out[sel] = rows[flat[sel] - a]
    return out.view(*ids.shape, -1)


# ---- the two one-layer models ------------------------------------------------------------
class HFLayerRunner:
    """transformers' LlamaModel with one decoder layer (weights swapped per layer)."""

    def __init__(self, config, dtype: torch.dtype, final_norm: torch.Tensor):
        from transformers import LlamaModel
        cfg = copy.deepcopy(config)
        cfg.num_hidden_layers = 1
        with torch.device("meta"):
            model = LlamaModel(cfg)
        # rope buffers are not weights: build them for real, in float32 like from_pretrained
        # does whatever the weights' dtype; the embedding is never used
        model.rotary_emb = type(model.rotary_emb)(config=cfg)
        model.norm.weight = torch.nn.Parameter(final_norm, requires_grad=False)
        self.model, self.dtype = model.eval(), dtype
        self._out = None
        model.layers[0].register_forward_hook(
            lambda m, a, o: setattr(self, "_out", check._first(o).detach()))

    def release(self) -> None:
        """Drop the layer's weights (back to meta) before the other side runs."""
        self.model.layers[0].to("meta")

    def load_layer(self, ref, layer: int) -> None:
        prefix = f"model.layers.{layer}."
        for name in (n for r in _LAYER_RULES for n in mapping.hf_names(r, layer)):
            (t,) = ref.read([name])
            key = "layers.0." + name[len(prefix):]
            self.model.load_state_dict({key: t.to(self.dtype)}, strict=False, assign=True)

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.model(inputs_embeds=hidden, use_cache=False)
        out, self._out = self._out, None
        return out

    @torch.no_grad()
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)


class McoreLayerRunner:
    """megatron_patch's megatron-core model with one decoder layer and no embedding/output
    (weights swapped per layer), plus the decoder's final norm built from the same spec."""

    def __init__(self, arch: LlamaArch, precision: str):
        from megatron.core.transformer.spec_utils import build_module

        from megatron_patch.backends import active_backend
        from megatron_patch.models.llama.config import ParallelSettings, transformer_config
        from megatron_patch.models.llama.provider import build_llama

        check.ensure_single_process_parallel()
        one = dataclasses.replace(arch, num_layers=1)
        cfg = transformer_config(one, ParallelSettings(1, 1), precision,
                                 perform_initialization=False)  # every weight is loaded
        self.model = build_llama(one, cfg, pre_process=False, post_process=False).eval()
        self.norm = build_module(active_backend().block_spec(cfg).layer_norm, config=cfg,
                                 hidden_size=cfg.hidden_size, eps=cfg.layernorm_epsilon).eval()
        self.local = any(n.endswith(".input_layernorm.weight")
                         for n, _ in self.model.named_parameters())
        self.release()

    def release(self) -> None:
        """Drop the layer's weights (to meta) before the other side runs; the rotary
        frequencies, outside the layer, stay."""
        self.model.decoder.layers[0].to("meta")

    @torch.no_grad()
    def load_layer(self, test, layer: int) -> None:
        self.model.decoder.layers[0].to_empty(device="cpu")  # storage, filled below
        self.params = dict(self.model.named_parameters())
        for rule in _LAYER_RULES:
            name = rule.mcore.format(i=0)
            if self.local:
                name = next(iter(mapping.to_local_names({name: None})))
            self.params[name].copy_(test.full(rule, layer))

    @torch.no_grad()
    def load_final_norm(self, weight: torch.Tensor) -> None:
        self.norm.weight.copy_(weight)

    @torch.no_grad()
    def __call__(self, hidden_sbh: torch.Tensor) -> torch.Tensor:
        # a model without pre-process reads its input like a later pipeline stage
        self.model.set_input_tensor(hidden_sbh)
        pos = torch.arange(hidden_sbh.shape[0]).unsqueeze(0)
        return self.model(None, pos, None)


# ---- the check -----------------------------------------------------------------------------
def hf_model_config(ref, arch: LlamaArch):
    """The reference's own config.json when it has one (what from_pretrained would use),
    else the one generated from the arch."""
    from transformers import LlamaConfig
    path = getattr(ref, "config_dir", None) or getattr(ref, "path", None)
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return LlamaConfig.from_pretrained(path, local_files_only=True)
    return check.hf_config(arch)


def stream_parity(ref, test, arch: LlamaArch, precision: str,
                  tokenizer_dir: Optional[str] = None,
                  layers: Optional[Sequence[int]] = None,
                  emit: Optional[Callable[[str], None]] = None) -> check.CheckResult:
    """The per-point parity table of ``ref`` (HF side) against ``test`` (megatron side),
    streamed; ``emit`` receives the header and each row as soon as it is known."""
    emit = emit or (lambda line: None)
    dtype = _dtype(precision)
    ids_list, desc = check.prompt_ids(arch, tokenizer_dir)
    ids = torch.tensor([ids_list])
    s = ids.shape[1]
    if layers is not None:
        desc += (f"; sampled layers {','.join(map(str, layers))}, each fed the embedding "
                 f"output")
    res = check.CheckResult(precision, check.tolerance(precision, arch), desc, s)
    spans = check.position_spans(arch, s)
    for line in res.header():
        emit(line)

    def record(point, r, g):  # r, g: [b, s, ...]
        for label, sl in spans:
            emit(res.row_line(res.add(point, label, check.compare(r[:, sl], g[:, sl]))))

    block = max(256, min(MAX_BLOCK_ROWS, LOGIT_BLOCK_ELEMS // max(1, arch.hidden_size)))
    v = arch.vocab_size
    h_ref = gather_rows(lambda a, b: ref.read_rows(EMBEDDING, a, b).to(dtype), v, ids, block)
    h_test = gather_rows(lambda a, b: test.embedding_rows(a, b).to(dtype), v, ids, block)
    record("embedding", h_ref, h_test)

    (norm_ref,) = ref.read(["model.norm.weight"])
    hf = HFLayerRunner(hf_model_config(ref, arch), dtype, norm_ref.to(dtype))
    mc = McoreLayerRunner(arch, precision)
    x_ref, x_test = h_ref, h_test.transpose(0, 1)  # megatron: [s, b, h]
    for i in (range(arch.num_layers) if layers is None else layers):
        # one side's layer weights in memory at a time
        hf.load_layer(ref, i)
        y_ref = hf(x_ref if layers is None else h_ref)
        hf.release()
        mc.load_layer(test, i)
        y_test = mc(x_test if layers is None else h_ref.transpose(0, 1))
        mc.release()
        if layers is None:
            x_ref, x_test = y_ref, y_test
        record(f"decoder layer {i}", y_ref, y_test.transpose(0, 1))
    if layers is not None:
        x_ref, x_test = h_ref, h_ref.transpose(0, 1)
    norm_rule = next(r for r in mapping.rules_for(arch)
                     if r.mcore == "decoder.final_layernorm.weight")
    mc.load_final_norm(test.full(norm_rule, None))
    n_ref, n_test = hf.final_norm(x_ref), mc.norm(x_test)
    record("final norm", n_ref, n_test.transpose(0, 1))
    del hf, mc

    # logits, a block of vocabulary rows at a time
    block = max(1, min(MAX_BLOCK_ROWS, LOGIT_BLOCK_ELEMS // max(1, s)))
    stats = [check.Stats() for _ in spans]
    out_name = hf_output_name(arch)
    for a, b in _row_blocks(v, block):
        l_ref = F.linear(n_ref, ref.read_rows(out_name, a, b).to(dtype))          # [b, s, r]
        l_test = torch.matmul(n_test, test.output_rows(a, b).to(dtype).t())      # [s, b, r]
        l_test = l_test.transpose(0, 1)
        for st, (_, sl) in zip(stats, spans):
            st.add(l_ref[:, sl], l_test[:, sl])
    for st, (label, _) in zip(stats, spans):
        emit(res.row_line(res.add("logits", label, st.result())))
    emit(res.summary())
    return res
