"""The two sides CHECK compares, read a tensor (or a block of vocabulary rows) at a time.

Reference side, HF names -- ``read(names)``, ``read_rows(name, start, stop)``,
``config_dir`` (a directory whose config.json describes the model, or None):
    HFCheckpoint / MetaCheckpoint   weights in files
    McoreAsHF                       a megatron checkpoint exported on the fly (the mg2hf
                                    CHECK_ONLY reference when no HF weights are given)

Side under test, whole (unsharded) megatron-core tensors -- ``full(rule, layer)``,
``output_rows(start, stop)``, ``embedding_rows(start, stop)``:
    SourceWeights                   a saved checkpoint in any TP/PP/VP layout or format
    HFAsMcore                       HF weights cut into TP shards by the converter's own
                                    functions and merged back (the hf2mcore CHECK_ONLY run)
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_patch.checkpoint.load import (TIED_OUTPUT_RULE, StateSource, merge_full,
                                            read_full_rows, read_full_tensor, saved_layout)
from megatron_patch.models.llama import mapping
from megatron_patch.models.llama.arch import LlamaArch

EMBEDDING = "model.embed_tokens.weight"


def _rule(arch: LlamaArch, mcore_name: str):
    return next(r for r in mapping.rules_for(arch) if r.mcore == mcore_name)


def hf_output_name(arch: LlamaArch) -> str:
    return EMBEDDING if arch.tie_word_embeddings else "lm_head.weight"


# ---- reference side ----------------------------------------------------------------------
class McoreAsHF:
    """HF tensors of a megatron checkpoint (any layout), merged and unpacked per read."""
    config_dir = None

    def __init__(self, source: StateSource, arch: LlamaArch):
        self.source, self.arch = source, arch
        self.layout = saved_layout(source)
        self._where = {}  # HF name -> (rule, layer, index among the rule's HF tensors)
        for rule in mapping.rules_for(arch):
            layers = range(arch.num_layers) if rule.stage == "layer" else [None]
            for layer in layers:
                for j, name in enumerate(mapping.hf_names(rule, layer)):
                    self._where[name] = (rule, layer, j)

    def read(self, names) -> list:
        out = []
        for name in names:
            rule, layer, j = self._where[name]
            full = read_full_tensor(self.source, self.layout, rule, layer, self.arch)
            out.append(mapping.unpack(rule, full, self.arch)[j].clone())
        return out

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        rule, layer, _ = self._where[name]
        return read_full_rows(self.source, self.layout, rule, layer, self.arch, start, stop)


# ---- side under test ---------------------------------------------------------------------
class SourceWeights:
    """A saved megatron checkpoint: each tensor merged from its TP shards when read."""

    def __init__(self, source: StateSource, arch: LlamaArch):
        self.source, self.arch = source, arch
        self.layout = saved_layout(source)
        if self.layout.num_layers != arch.num_layers:
            raise ValueError(f"the checkpoint holds {self.layout.num_layers} layers, the model "
                             f"has {arch.num_layers}")

    def full(self, rule, layer: Optional[int]) -> torch.Tensor:
        return read_full_tensor(self.source, self.layout, rule, layer, self.arch)

    def embedding_rows(self, start: int, stop: int) -> torch.Tensor:
        rule = _rule(self.arch, "embedding.word_embeddings.weight")
        return read_full_rows(self.source, self.layout, rule, None, self.arch, start, stop)

    def output_rows(self, start: int, stop: int) -> torch.Tensor:
        # tied embeddings: the last stage's own copy when PP > 1, else the embedding
        rule = TIED_OUTPUT_RULE if self.arch.tie_word_embeddings else \
            _rule(self.arch, "output_layer.weight")
        return read_full_rows(self.source, self.layout, rule, None, self.arch, start, stop)


class HFAsMcore:
    """What the converter would write at TP=tp, in memory, one tensor at a time: HF tensors
    cast to ``dtype``, packed (fused qkv, gate|up, padded vocabulary) and cut into TP shards
    by the mapping functions the converter uses, then merged back."""

    def __init__(self, hf, arch: LlamaArch, tp: int, dtype: torch.dtype):
        self.hf, self.arch, self.tp, self.dtype = hf, arch, tp, dtype
        self.padded = arch.padded_vocab_size(tp)

    def full(self, rule, layer: Optional[int]) -> torch.Tensor:
        parts = [t.to(self.dtype) for t in self.hf.read(mapping.hf_names(rule, layer))]
        packed = mapping.pack(rule, parts, self.arch, self.padded)
        shards = [mapping.shard(rule, packed, self.tp, t) for t in range(self.tp)]
        return merge_full(rule, shards, self.arch)

    # The vocabulary's TP split is a split into row blocks (checked bit for bit by the
    # round-trip tests); a block of rows is read straight from the HF tensor.
    def embedding_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.hf.read_rows(EMBEDDING, start, stop).to(self.dtype)

    def output_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.hf.read_rows(hf_output_name(self.arch), start, stop).to(self.dtype)
