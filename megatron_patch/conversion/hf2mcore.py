"""HF -> megatron-core, streamed: one mapping rule's tensors at a time, each TP shard
appended to its rank file as soon as it is cut (the files of a PP stage are finished when
the stage's last layer is done). Shards that are whole source rows in the target dtype are
copied file-to-file by the kernel (rowcopy); the rest goes through one tensor in memory."""
from __future__ import annotations

import collections
import os
from typing import Optional

import torch
from tqdm import tqdm

from megatron_patch.checkpoint import StreamingTorchWriter, checkpoint_file, checkpoint_state
from megatron_patch.checkpoint.load import chunk_layout, stage_rules
from megatron_patch.models.llama.arch import LlamaArch

from megatron_patch.models.llama import mapping
from megatron_patch.models.llama.parallel_layout import check_layout
from .hf_files import HFCheckpoint
from .rowcopy import plan_blocks


def validate_hf(hf: HFCheckpoint, arch: LlamaArch) -> None:
    """Every tensor the model needs is present with the shape ``arch`` implies."""
    problems = []
    for name, shape in mapping.hf_tensor_plan(arch):
        if name not in hf:
            problems.append(f"{name} missing")
        elif hf.shape(name) != tuple(shape):
            problems.append(f"{name} has shape {hf.shape(name)}, expected {tuple(shape)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{hf.path} does not match the model: {'; '.join(problems[:3])}{more}")


# megatron-core modules whose state dict has an ``_extra_state`` entry (None for the local
# spec; TE accepts None too): writing them lets a strict load_state_dict accept the file
_EXTRA_STATE = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
                "mlp.linear_fc2")


def stage_plan(arch: LlamaArch, pp: int, pp0_layers: Optional[int] = None,
               vp: Optional[int] = None) -> list:
    """[(pp_rank, [(chunk, mcore name, rule, global layer)], [(chunk, extra-state names)])]
    in megatron-core state-dict order; chunk = virtual pipeline stage (0 without VP)."""
    out = []
    for p in range(pp):
        items, extra = [], []
        for v, (layers, first, last) in enumerate(chunk_layout(arch.num_layers, pp, p, vp,
                                                               pp0_layers)):
            rules = stage_rules(arch, first, last)
            items += [(v, r.mcore, r, None) for r in rules if r.stage == "first"]
            for j, i in enumerate(layers):
                items += [(v, r.mcore.format(i=j), r, i) for r in rules if r.stage == "layer"]
            items += [(v, r.mcore, r, None) for r in rules if r.stage == "last"]
            extra.append((v, [f"decoder.layers.{j}.{m}._extra_state"
                              for j in range(len(layers)) for m in _EXTRA_STATE]
                          + (["output_layer._extra_state"] if last else [])))
        out.append((p, items, extra))
    return out


class FileSink:
    """Rank files of one iteration directory, written with StreamingTorchWriter; with
    virtual pipeline a file holds one state dict per chunk (model0, model1, ...)."""

    def __init__(self, iter_dir: str, pp: int, args, iteration="release",
                 vp: Optional[int] = None):
        self.iter_dir, self.pp, self.args, self.iteration = iter_dir, pp, args, iteration
        self.chunks = vp or 1

    def open(self, tp_rank: int, pp_rank: int):
        path = checkpoint_file(self.iter_dir, tp_rank, pp_rank, self.pp)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return _FileRank(path, self)


class _FileRank:
    def __init__(self, path, sink):
        self.writer = StreamingTorchWriter(path)
        self.models = [collections.OrderedDict() for _ in range(sink.chunks)]
        self.sink = sink

    def add(self, chunk, name, tensor):
        self.models[chunk][name] = self.writer.add(tensor)

    def add_bytes(self, chunk, name, dtype, shape, source):
        self.models[chunk][name] = self.writer.add_bytes(dtype, shape, source)

    def add_extra_state(self, chunk, names):
        self.models[chunk].update((n, None) for n in names)

    def close(self):
        self.writer.close(checkpoint_state(self.models, self.sink.iteration, self.sink.args))


def hf_to_mcore(hf: HFCheckpoint, arch: LlamaArch, tp: int, pp: int, dtype: torch.dtype,
                sink, pp0_layers: Optional[int] = None, progress: bool = True,
                byte_copy: bool = True, vp: Optional[int] = None) -> None:
    check_layout(arch, tp=tp)
    plan = stage_plan(arch, pp, pp0_layers, vp)
    padded = arch.padded_vocab_size(tp)
    byte_copy = byte_copy and getattr(sink, "byte_copy", True)
    total = sum(hf.nbytes(n) for _, items, _ in plan for _, _, rule, layer in items
                for n in mapping.hf_names(rule, layer))
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"hf->mcore TP={tp} PP={pp}",
              disable=not progress, dynamic_ncols=True) as bar:
        for p, items, extra in plan:
            ranks = [sink.open(t, p) for t in range(tp)]
            for chunk, name, rule, layer in items:
                names = mapping.hf_names(rule, layer)

                def to_ranks(parts, rule=rule):
                    full = mapping.pack(rule, parts, arch, padded)
                    return [mapping.shard(rule, full, tp, t) for t in range(tp)]

                plans = plan_blocks(to_ranks, [hf.locate(n) for n in names], dtype) \
                    if byte_copy else None
                if plans is not None:  # bytes copied from the HF files, no tensor math
                    for rank, (shape, plan) in zip(ranks, plans):
                        rank.add_bytes(chunk, name, dtype, shape, plan)
                    del plans
                else:
                    shards = to_ranks([t.to(dtype) for t in hf.read(names)])
                    for rank, shard in zip(ranks, shards):
                        rank.add(chunk, name, shard)
                    del shards
                bar.update(sum(hf.nbytes(n) for n in names))
            for rank in ranks:  # the stage's files are complete now
                for chunk, names in extra:
                    rank.add_extra_state(chunk, names)
                rank.close()
