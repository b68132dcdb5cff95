"""HF -> megatron-core's torch_dist format (checkpoint/dist_format.py), streamed.

A torch_dist checkpoint stores every tensor whole, so there is no TP/PP to cut for: each
mapping rule gives one global tensor (decoder-layer rules one per layer, stacked along the
leading axis of ``decoder.layers.<name>``, as megatron-core's sharded state dict keys them).
The vocabulary is padded for the TP given (what a run at that TP saves; megatron-core loads
other paddings too). Each tensor is produced from the HF files when the writer reaches it.
"""
from __future__ import annotations

from typing import Optional

import torch
from tqdm import tqdm

from megatron_patch.checkpoint.dist_format import (LAYERS_PREFIX, Chunk, StoredTensor,
                                                   extra_state_objects, write_dist_checkpoint)
from megatron_patch.models.llama import mapping
from megatron_patch.models.llama.arch import LlamaArch

_LAYER_NAME = "decoder.layers.{i}."


def _full(reader, rule, layer, arch, padded, dtype) -> torch.Tensor:
    parts = [t.to(dtype) for t in reader.read(mapping.hf_names(rule, layer))]
    return mapping.pack(rule, parts, arch, padded)


def dist_tensors(reader, arch: LlamaArch, tp: int, dtype: torch.dtype) -> list:
    """[StoredTensor] of the whole model, each chunk produced on demand from ``reader``."""
    padded = arch.padded_vocab_size(tp)
    out = []
    for rule in mapping.rules_for(arch):
        layer0 = 0 if rule.stage == "layer" else None
        metas = [torch.empty(reader.shape(n), device="meta")
                 for n in mapping.hf_names(rule, layer0)]
        shape = tuple(mapping.pack(rule, metas, arch, padded).shape)
        zeros = (0,) * len(shape)
        if rule.stage == "layer":
            chunks = [Chunk((i,) + zeros, (1,) + shape,
                            lambda i=i, rule=rule: _full(reader, rule, i, arch, padded,
                                                         dtype).unsqueeze(0))
                      for i in range(arch.num_layers)]
            out.append(StoredTensor(LAYERS_PREFIX + rule.mcore[len(_LAYER_NAME):],
                                    (arch.num_layers,) + shape, dtype, chunks))
        else:
            chunks = [Chunk(zeros, shape,
                            lambda rule=rule: _full(reader, rule, None, arch, padded, dtype))]
            out.append(StoredTensor(rule.mcore, shape, dtype, chunks))
    return out


def hf_to_dist(reader, arch: LlamaArch, tp: int, dtype: torch.dtype, iter_dir: str,
               common: dict, progress: bool = True, total_bytes: Optional[int] = None) -> None:
    tensors = dist_tensors(reader, arch, tp, dtype)
    total = total_bytes or sum(dtype.itemsize * torch.Size(t.global_shape).numel()
                               for t in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="hf->mcore torch_dist",
              disable=not progress, dynamic_ncols=True) as bar:
        write_dist_checkpoint(iter_dir, tensors, extra_state_objects(arch.num_layers), common,
                              progress=bar.update)
