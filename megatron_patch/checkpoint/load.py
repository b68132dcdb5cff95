"""Reading model weights from a Megatron checkpoint for any (TP, PP, VP) layout.

A rank's state comes straight from its file when the saved layout equals the requested
one; otherwise it is re-sharded tensor by tensor from the saved files (merge the saved TP
shards, cut/re-pad the vocabulary, cut the requested shard), so memory holds one rank's
state plus one full tensor. Only the ``model`` entries are read: optimizer, scheduler and
RNG state in training checkpoints are never loaded. Both formats are read: per-rank files
(``FileSource``) and megatron-core's torch_dist (``DistSource``); ``open_source`` picks.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_patch.models.llama import mapping
from megatron_patch.models.llama.parallel_layout import check_layout
from megatron_patch.models.llama.arch import LlamaArch
from megatron_patch.models.llama.resolve import read_hf_config

from .dist_format import DistFile, model_tensors, read_common
from .layout import CheckpointDir, Iteration, find_checkpoint
from .torch_file import LazyTensor, LazyTorchFile, materialize, rows_of

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# With tied embeddings and PP > 1 megatron-core's last stage keeps its own copy of the
# embedding as output_layer.weight (kept equal by an all-reduce over the embedding group).
TIED_OUTPUT_RULE = mapping.Rule("output_layer.weight", ("model.embed_tokens.weight",),
                                "vocab", 0, "last")


def stage_rules(arch: LlamaArch, first: bool, last: bool) -> list:
    """Mapping rules present on a model chunk (embedding on the first, norm/output on the
    last; the tied output copy on a last chunk that is not also first)."""
    rules = [r for r in mapping.rules_for(arch)
             if r.stage == "layer" or (r.stage == "first" and first)
             or (r.stage == "last" and last)]
    if arch.tie_word_embeddings and last and not first:
        rules.append(TIED_OUTPUT_RULE)
    return rules


def chunk_layout(num_layers: int, pp: int, pp_rank: int, vp: Optional[int] = None,
                 pp0_layers: Optional[int] = None) -> list:
    """[(global layers, is_first_chunk, is_last_chunk)] for each model chunk of a PP rank."""
    n = vp or 1
    return [(mapping.stage_layers(num_layers, pp, pp_rank, vp, v, pp0_layers),
             pp_rank == 0 and v == 0, pp_rank == pp - 1 and v == n - 1) for v in range(n)]


class StateSource:
    """Saved model chunks by (tp_rank, pp_rank): ``chunks(t, p)`` -> [ {name: tensor or
    LazyTensor} per virtual stage ], names in the file (TE) convention."""

    def __init__(self, tp: int, pp: int):
        self.tp, self.pp = tp, pp

    def chunks(self, tp_rank: int, pp_rank: int) -> list:
        raise NotImplementedError

    def close(self):
        pass


class MemorySource(StateSource):
    def __init__(self, states: dict):
        tp = 1 + max(t for t, _ in states)
        pp = 1 + max(p for _, p in states)
        super().__init__(tp, pp)
        self._states = {k: [mapping.to_te_names(sd) for sd in v] for k, v in states.items()}

    def chunks(self, tp_rank, pp_rank):
        return self._states[(tp_rank, pp_rank)]


class FileSource(StateSource):
    """Rank files of a checkpoint, opened lazily (structure only until a tensor is read)."""

    def __init__(self, ckpt: CheckpointDir):
        super().__init__(ckpt.tp, ckpt.pp)
        self.ckpt = ckpt
        self._open: dict = {}

    def file(self, tp_rank, pp_rank) -> LazyTorchFile:
        key = (tp_rank, pp_rank)
        if key not in self._open:
            f = LazyTorchFile(self.ckpt.file(tp_rank, pp_rank))
            self._open[key] = (f, _model_chunks(f.obj, f.path))
        return self._open[key][0]

    def chunks(self, tp_rank, pp_rank):
        self.file(tp_rank, pp_rank)
        return self._open[(tp_rank, pp_rank)][1]

    def args(self):
        obj = self.file(0, 0).obj
        return obj.get("args") if isinstance(obj, dict) else None

    def close(self):
        for f, _ in self._open.values():
            f.close()
        self._open.clear()


class DistSource(StateSource):
    """A torch_dist checkpoint (dist_format.py): one whole model, each tensor (or decoder
    layer of a stacked tensor) read when it is used; seen as one TP=1 PP=1 chunk."""

    def __init__(self, ckpt: CheckpointDir):
        super().__init__(1, 1)
        self.ckpt = ckpt
        self.file = DistFile(ckpt.path)
        self._chunk = model_tensors(self.file)
        if not self._chunk:
            raise ValueError(f"{ckpt.path}: no model tensors in this torch_dist checkpoint")

    def chunks(self, tp_rank, pp_rank):
        return [self._chunk]

    def args(self):
        return read_common(self.ckpt.path).get("args")


def open_source(ckpt: CheckpointDir) -> StateSource:
    """The model weights of a checkpoint found by find_checkpoint, in either format."""
    return DistSource(ckpt) if ckpt.format == "torch_dist" else FileSource(ckpt)


def _model_chunks(obj, path) -> list:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a Megatron checkpoint (top level is {type(obj).__name__})")
    if "model" in obj:
        sds = [obj["model"]]
    else:
        keys = sorted((k for k in obj if re.fullmatch(r"model\d+", str(k))), key=lambda k: int(k[5:]))
        if not keys:
            raise ValueError(f"{path}: no 'model' entry (keys: {sorted(map(str, obj))})")
        sds = [obj[k] for k in keys]
    return [mapping.to_te_names({k: v for k, v in sd.items()
                                 if isinstance(v, (torch.Tensor, LazyTensor))}) for sd in sds]


@dataclass
class SavedLayout:
    tp: int
    pp: int
    vp: int                 # model chunks per PP rank (1 without virtual pipeline)
    where: dict             # global layer -> (pp_rank, vp_stage, local index)
    num_layers: int

    def chunk_layers(self, pp_rank, v) -> list:
        return sorted(i for i, (p, c, _) in self.where.items() if (p, c) == (pp_rank, v))


def saved_layout(source: StateSource) -> SavedLayout:
    """Where each global layer lives, from the layer names of the TP-rank-0 files; chunks
    are numbered in megatron-core's interleaved order (vp stage major, then PP rank)."""
    counts = {}
    vp = None
    for p in range(source.pp):
        chunks = source.chunks(0, p)
        if vp is None:
            vp = len(chunks)
        elif vp != len(chunks):
            raise ValueError("PP ranks hold different numbers of model chunks")
        for v, sd in enumerate(chunks):
            counts[(p, v)] = len({int(m.group(1)) for m in map(_LAYER_RE.match, sd) if m})
    where, g = {}, 0
    for v in range(vp):
        for p in range(source.pp):
            for j in range(counts[(p, v)]):
                where[g] = (p, v, j)
                g += 1
    return SavedLayout(source.tp, source.pp, vp, where, g)


def source_shards(source: StateSource, layout: SavedLayout, rule, layer, arch) -> list:
    """The saved TP shards (LazyTensor or tensor) of ``rule`` at global ``layer``."""
    if rule.stage == "layer":
        p, v, j = layout.where[layer]
        name = rule.mcore.format(i=j)
    elif rule.stage == "first":
        p, v, name = 0, 0, rule.mcore
    else:
        p, v, name = layout.pp - 1, layout.vp - 1, rule.mcore
        if rule.mcore == "output_layer.weight" and arch.tie_word_embeddings and \
                name not in source.chunks(0, p)[v]:
            p, v, name = 0, 0, "embedding.word_embeddings.weight"
    shards = []
    for t in range(layout.tp):
        sd = source.chunks(t, p)[v]
        if name not in sd:
            raise KeyError(f"checkpoint TP rank {t} PP rank {p}: missing {name}")
        shards.append(sd[name])
    return shards


def merge_full(rule, shards, arch) -> torch.Tensor:
    """Saved TP shards -> the whole megatron tensor; the vocabulary padding (which depends
    on the TP size it was saved with) is cut off."""
    full = mapping.merge(rule, shards)
    return full[: arch.vocab_size] if rule.kind == "vocab" else full


def read_full_tensor(source: StateSource, layout: SavedLayout, rule, layer, arch) -> torch.Tensor:
    """The whole (unsharded) megatron tensor of ``rule`` (at global ``layer``)."""
    shards = [materialize(x) for x in source_shards(source, layout, rule, layer, arch)]
    return merge_full(rule, shards, arch)


def read_full_rows(source: StateSource, layout: SavedLayout, rule, layer, arch, start: int,
                   stop: int) -> torch.Tensor:
    """Rows [start, stop) of the whole megatron tensor of ``rule``, reading only those rows
    when the TP shards are plain row blocks (the vocabulary tensors: embedding, output)."""
    shards = source_shards(source, layout, rule, layer, arch)
    if rule.tp_dim not in (0, None) or rule.kind in ("qkv", "gate_up"):
        return read_full_tensor(source, layout, rule, layer, arch)[start:stop]
    if rule.kind == "vocab":
        stop = min(stop, arch.vocab_size)
    parts, offset = [], 0
    for x in (shards if rule.tp_dim == 0 else shards[:1]):
        n = x.shape[0]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            parts.append(rows_of(x, lo - offset, hi - offset))
        offset += n
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def reshard_state(source: StateSource, arch: LlamaArch, tp: int, pp: int, tp_rank: int,
                  pp_rank: int, vp: Optional[int] = None, pp0_layers: Optional[int] = None,
                  layout: Optional[SavedLayout] = None) -> list:
    """[state dict per model chunk] of (tp_rank, pp_rank) in the requested layout, TE names."""
    layout = layout or saved_layout(source)
    if layout.num_layers != arch.num_layers:
        raise ValueError(f"checkpoint has {layout.num_layers} layers, the model "
                         f"{arch.num_layers}")
    check_layout(arch, tp=tp)
    targets = chunk_layout(arch.num_layers, pp, pp_rank, vp, pp0_layers)
    same = (tp, pp, vp or 1) == (layout.tp, layout.pp, layout.vp) and all(
        layers == layout.chunk_layers(pp_rank, v) for v, (layers, _, _) in enumerate(targets))
    if same:
        return [{k: materialize(t) for k, t in sd.items()} for sd in source.chunks(tp_rank, pp_rank)]
    padded = arch.padded_vocab_size(tp)
    out = []
    for layers, first, last in targets:
        sd = {}
        for rule in stage_rules(arch, first, last):
            for name, layer in mapping.mcore_names(rule, layers, first, last):
                full = read_full_tensor(source, layout, rule, layer, arch)
                if rule.kind == "vocab":
                    full = mapping.pack(rule, [full], arch, padded)
                sd[name] = mapping.shard(rule, full, tp, tp_rank).clone()
                del full
        out.append(sd)
    return out


def checkpoint_arch(ckpt: CheckpointDir, source: Optional[StateSource] = None) -> Optional[LlamaArch]:
    """The model's LlamaArch: from the checkpoint's args (written by megatron_patch), else
    from a config.json next to the checkpoint; None when neither exists."""
    src = source or open_source(ckpt)
    try:
        args = src.args()
    finally:
        if source is None:
            src.close()
    d = getattr(args, "megatron_patch_arch", None)
    if isinstance(d, dict):
        return LlamaArch(**d)
    cfg = os.path.join(ckpt.root, "config.json")
    if os.path.isfile(cfg):
        return read_hf_config(cfg)  # a bad file: one line naming it (ArchError)
    return None


def load_model_state(ckpt_path: str, tp: int = 1, pp: int = 1, tp_rank: int = 0,
                     pp_rank: int = 0, vp: Optional[int] = None,
                     pp0_layers: Optional[int] = None, arch: Optional[LlamaArch] = None,
                     iteration: Optional[Iteration] = None) -> list:
    """State dicts (one per model chunk, TE names, tensors) for (tp_rank, pp_rank) of a
    TP x PP (x VP) model, from the checkpoint at ``ckpt_path`` whatever layout it was saved
    in. ``ckpt_path`` is a checkpoint root or an iteration directory."""
    ckpt = find_checkpoint(ckpt_path, iteration)
    source = open_source(ckpt)
    try:
        arch = arch or checkpoint_arch(ckpt, source)
        if arch is None:
            raise ValueError(f"{ckpt_path}: pass arch= (the checkpoint has no megatron_patch "
                             f"args and no config.json next to it)")
        return reshard_state(source, arch, tp, pp, tp_rank, pp_rank, vp, pp0_layers)
    finally:
        source.close()


SAFE_GLOBALS = [argparse.Namespace]  # what our files hold beyond tensors and containers


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds Python objects other than tensors and plain containers:
    unpickling it could run arbitrary code, so it is refused."""


def safe_torch_load(path: str, mmap: bool = False):
    """``torch.load(weights_only=True)``: tensors, containers, numbers, strings and the
    ``argparse.Namespace`` of ``args`` only. Anything else -- e.g. a pickle whose
    ``__reduce__`` would run code -- raises UnsafeCheckpointError naming the file."""
    import pickle
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(e))
            what = f" ({found.group(1)})" if found else ""
            raise UnsafeCheckpointError(
                f"{path}: refused to load: it holds Python objects other than tensors and "
                f"plain containers{what}; loading it could run code") from None


def load_rank_file(path: str, mmap: bool = True) -> dict:
    """A whole rank file through ``safe_torch_load`` (training's optimizer/RNG entries).
    Model weights: prefer load_model_state."""
    return safe_torch_load(path, mmap=mmap)


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    return model


def load_model_shards(ckpt_path: str, model_chunks, tp_rank: Optional[int] = None,
                      pp_rank: Optional[int] = None, *, arch: Optional[LlamaArch] = None,
                      iteration: Optional[Iteration] = None, strict: bool = True) -> CheckpointDir:
    """Load weights into this rank's model chunk(s) (one module or the VP list). TP/PP/VP
    sizes and ranks default to megatron-core's parallel_state; the saved layout may differ.
    Names are adapted to the model (TE spec or local spec). Returns the checkpoint found."""
    from megatron.core import parallel_state as ps

    chunks = [_unwrap(m) for m in (model_chunks if isinstance(model_chunks, (list, tuple))
                                   else [model_chunks])]
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    pp_rank = ps.get_pipeline_model_parallel_rank() if pp_rank is None else pp_rank
    vp = len(chunks) if len(chunks) > 1 else None
    pp0 = getattr(chunks[0].config, "num_layers_in_first_pipeline_stage", None) if pp > 1 else None
    ckpt = find_checkpoint(ckpt_path, iteration)
    source = open_source(ckpt)
    try:
        arch = arch or checkpoint_arch(ckpt, source)
        if arch is None:
            raise ValueError(f"{ckpt_path}: pass arch= (no megatron_patch args, no config.json)")
        states = reshard_state(source, arch, tp, pp, tp_rank, pp_rank, vp, pp0)
    finally:
        source.close()
    for model, sd in zip(chunks, states):
        load_into(model, sd, strict)
    return ckpt


def load_into(model, state: dict, strict: bool = True) -> None:
    """load_state_dict with names adapted to the model's spec; ``_extra_state`` entries the
    file lacks are fine (TE fp8 metadata / None for local layers)."""
    own = model.state_dict()
    local = any(k.endswith(".input_layernorm.weight") for k in own)
    sd = mapping.to_local_names(state) if local else mapping.to_te_names(state)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if strict and (missing or unexpected):
        raise KeyError(f"checkpoint does not match the model: missing {missing[:8]}"
                       f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")
