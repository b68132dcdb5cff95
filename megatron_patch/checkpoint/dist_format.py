"""megatron-core's distributed checkpoint format (``torch_dist``) next to the per-rank files.

An iteration directory in this format (what ``megatron.core.dist_checkpointing.save`` with
the torch_dist strategy writes, and Megatron-LM with ``--ckpt-format torch_dist``)::

    <root>/latest_checkpointed_iteration.txt        as for the per-rank format
    <root>/release | iter_%07d/
        metadata.json        {"sharded_backend": "torch_dist", ...}
        .metadata            PyTorch DCP metadata: every tensor's GLOBAL shape and where its
                             chunks are stored
        __R_N.distcp         the chunks
        common.pt            the non-sharded part (args, iteration, scheduler state, ...)

Tensors are stored whole, whatever layout wrote them (TP shards are chunks of the global
tensor, decoder layers are stacked along a leading axis of ``decoder.layers.<name>``), so a
checkpoint saved at one TP/PP/VP loads at any other -- megatron-core reads the slices each
rank needs. Vocabulary tensors keep the padding of the layout that wrote them; megatron-core
loads them with ``allow_shape_mismatch`` (zeros beyond the saved rows).

Here:
- detection and ``common.pt`` reading (no megatron-core import);
- ``DistSource``: a checkpoint as a ``StateSource`` (load.py) whose tensors are read on
  demand, one decoder layer or a block of vocabulary rows at a time, through PyTorch DCP
  with a region-reading load planner (no process group needed): the converter's mg2hf and
  CHECK, and ``load_model_state`` for any layout;
- ``write_dist_checkpoint``: a single process writes a whole checkpoint from tensors
  produced one chunk at a time (the converter: memory holds one tensor);
- ``save_training_checkpoint`` / ``load_training_checkpoint``: model chunks + optimizer +
  per-rank state through megatron-core's ``dist_checkpointing`` (collective, atomic: a
  staging directory renamed into place, tracker last), loadable at another TP/PP.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .optimizer_state import (adam_step, is_distributed, materialize_adam_state,
                              resync_adam_step, step_set_aside, sub_optimizers)
from .layout import DIST_FORMAT
from .torch_file import LazyTensor

COMMON_FILE = "common.pt"
FORMAT = DIST_FORMAT
LAYERS_PREFIX = "decoder.layers."
# per-layer modules whose _extra_state megatron-core saves as a ShardedObject
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv",
                       "mlp.linear_fc1", "mlp.linear_fc2")


def safe_globals() -> list:
    """What checkpoints hold beyond tensors and containers, for ``weights_only`` loads:
    argparse.Namespace (args) and numpy's RNG state arrays (in training's RNG state)."""
    import numpy as np

    from .load import SAFE_GLOBALS
    core = getattr(np, "_core", None) or np.core
    return list(SAFE_GLOBALS) + [core.multiarray._reconstruct, np.ndarray, np.dtype,
                                 type(np.dtype(np.uint32))]


def read_common(iter_dir: str) -> dict:
    """common.pt (args, iteration, ...) with ``weights_only=True``."""
    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(os.path.join(iter_dir, COMMON_FILE), map_location="cpu",
                          weights_only=True)


# ---- reading regions through PyTorch DCP ------------------------------------------------------
def _dcp():
    import torch.distributed.checkpoint as dcp
    return dcp


def _region_planner(key: str, offsets: Sequence[int], sizes: Sequence[int]):
    """A DCP load planner reading one region (offsets, sizes) of one stored tensor into the
    state dict's tensor of that region's shape."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionPlanner(DefaultLoadPlanner):
        def create_local_plan(self):
            md = self.metadata.state_dict_metadata[key]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            return LoadPlan(create_read_items_for_chunk_list(key, md, [chunk]))

        def resolve_tensor(self, read_item):  # offsets are relative to the region
            t = self.state_dict[key]
            for dim, (start, length) in enumerate(zip(read_item.dest_offsets,
                                                      read_item.lengths)):
                t = t.narrow(dim, start, length)
            return t

    return RegionPlanner()


class DistFile:
    """One torch_dist iteration directory: tensor metadata, and regions read on demand."""

    def __init__(self, iter_dir: str):
        self.path = iter_dir
        dcp = _dcp()
        self.metadata = dcp.FileSystemReader(iter_dir).read_metadata()
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if hasattr(v, "chunks")}

    def read_region(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        md = self.tensors[key]
        out = torch.empty(tuple(sizes), dtype=md.properties.dtype)
        _dcp().load({key: out}, storage_reader=_dcp().FileSystemReader(self.path),
                    planner=_region_planner(key, offsets, sizes), no_dist=True)
        return out

    # LazyTensor's file interface
    def location(self, lt):
        return None  # no raw byte ranges: the converter takes the tensor path

    def read_tensor(self, lt: "DistTensor") -> torch.Tensor:
        return self.read_rows(lt, 0, lt.shape[0])

    def read_rows(self, lt: "DistTensor", start: int, stop: int) -> torch.Tensor:
        key, layer = lt.key
        start, stop = max(0, start), min(stop, lt.shape[0])
        rest = list(lt.shape[1:])
        if layer is None:
            return self.read_region(key, [start] + [0] * len(rest), [stop - start] + rest)
        t = self.read_region(key, [layer, start] + [0] * len(rest), [1, stop - start] + rest)
        return t[0]

    def close(self):
        pass


class DistTensor(LazyTensor):
    """A stored tensor (or one decoder layer of a stacked one) read on demand."""
    __slots__ = ()


def model_tensors(f: DistFile) -> dict:
    """{megatron-core name (TE names, per-layer ``decoder.layers.<i>.``): DistTensor} of the
    model weights in a torch_dist checkpoint (optimizer state and objects left out)."""
    out = {}
    for key, md in f.tensors.items():
        shape = tuple(md.size)
        if key.startswith(("optimizer.", "rng_state")):
            continue
        if key.startswith(LAYERS_PREFIX):
            suffix = key[len(LAYERS_PREFIX):]
            stride = torch.empty(shape[1:], device="meta").stride()
            for i in range(shape[0]):
                out[f"{LAYERS_PREFIX}{i}.{suffix}"] = DistTensor(
                    f, (key, i), md.properties.dtype, 0, shape[1:], stride)
        elif key.startswith(("embedding.", "decoder.", "output_layer.")):
            stride = torch.empty(shape, device="meta").stride()
            out[key] = DistTensor(f, (key, None), md.properties.dtype, 0, shape, stride)
    return out


# ---- writing from a single process -------------------------------------------------------------
@dataclass
class Chunk:
    offsets: tuple           # in the global tensor
    sizes: tuple
    produce: Callable        # () -> tensor of ``sizes`` (called once, when it is written)


@dataclass
class StoredTensor:
    key: str
    global_shape: tuple
    dtype: torch.dtype
    chunks: list             # [Chunk]


def _object_bytes(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save([obj], buf)  # megatron-core stores a ShardedObject's data as a 1-list
    buf.seek(0)
    return buf


def extra_state_objects(num_layers: int) -> dict:
    """The per-layer ``_extra_state`` ShardedObjects megatron-core's local spec saves
    (value None), under megatron-core's unique keys."""
    return {f"{LAYERS_PREFIX}{m}._extra_state/shard_{i}_{num_layers}": None
            for m in EXTRA_STATE_MODULES for i in range(num_layers)}


def write_dist_checkpoint(iter_dir: str, tensors: Sequence[StoredTensor], objects: dict,
                          common: dict, progress: Optional[Callable[[int], None]] = None) -> None:
    """Write a complete torch_dist checkpoint into the (empty) ``iter_dir`` from one process:
    each chunk's tensor is produced when the writer reaches it and dropped once written."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                       TensorProperties)
    from torch.distributed.checkpoint.planner import (SavePlan, TensorWriteData, WriteItem,
                                                      WriteItemType)

    produce, items = {}, []
    for t in tensors:
        props = TensorProperties(dtype=t.dtype)
        for c in t.chunks:
            index = MetadataIndex(t.key, torch.Size(c.offsets))
            data = TensorWriteData(
                chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)),
                properties=props, size=torch.Size(t.global_shape))
            items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=data))
            produce[index] = (c, t.dtype)
    for key, obj in objects.items():
        index = MetadataIndex(key)
        items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
        produce[index] = obj

    class Planner(DefaultSavePlanner):
        def create_local_plan(self):
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, item):
            entry = produce[item.index]
            if item.type == WriteItemType.BYTE_IO:
                return _object_bytes(entry)
            chunk, dtype = entry
            t = chunk.produce().to(dtype).contiguous()
            if tuple(t.shape) != tuple(chunk.sizes):
                raise ValueError(f"{item.index.fqn}: produced {tuple(t.shape)}, planned "
                                 f"{tuple(chunk.sizes)}")
            if progress:
                progress(t.nbytes)
            return t

    writer = FileSystemWriter(iter_dir, single_file_per_rank=True, thread_count=1,
                              sync_files=True, overwrite=True)
    _dcp().save({}, storage_writer=writer, no_dist=True,
                planner=Planner(flatten_state_dict=False, flatten_sharded_tensors=False))
    torch.save(common, os.path.join(iter_dir, COMMON_FILE))
    save_config(CheckpointingConfig(FORMAT, 1), iter_dir)  # metadata.json, written last


# ---- training: model chunks + optimizer + per-rank state, collective --------------------------
LAYOUT_KEY = "megatron_patch_layout"   # common.pt: {"tp", "pp", "dp"} of the run that saved
ADAM_STEPS_KEY = "megatron_patch_adam_steps"  # common.pt: torch Adam step per sub-optimizer
RANK_STATE_KEY = "rank_state"          # a ShardedObject per (PP, TP) rank: per-DP-rank list
DO_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    return model


def _model_keys(n: int) -> list:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]  # Megatron-LM's names


def sharded_training_state(model_chunks, optimizer=None, is_loading: bool = False) -> dict:
    """megatron-core sharded state dicts of the model chunks (and of the optimizer, whose
    state is keyed by the model tensors it belongs to, so it re-shards with them; the
    distributed optimizer in model space, 'fully_sharded_model_space')."""
    chunks = [_unwrap(m) for m in (model_chunks if isinstance(model_chunks, (list, tuple))
                                   else [model_chunks])]
    sd = {k: c.sharded_state_dict() for k, c in zip(_model_keys(len(chunks)), chunks)}
    if optimizer is not None:
        for opt in sub_optimizers(optimizer):
            if is_distributed(opt) and adam_step(opt) is None:
                materialize_adam_state(opt)  # its state_dict() asserts before the first step
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading,
                                                       metadata=dict(DO_SHARDING))
    return sd


def _layout() -> dict:
    from megatron.core import parallel_state as ps
    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rank_object(data):
    """``data`` of every DP rank of this (TP, PP) rank as one ShardedObject (written by DP
    rank 0), like Megatron-LM's rng_state."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    where = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    return ShardedObject(RANK_STATE_KEY, data, (pp, tp), where,
                         replica_id=ps.get_data_parallel_rank())


def save_training_checkpoint(root: str, iteration, model_chunks, optimizer=None,
                             common: Optional[dict] = None, rank_state=None) -> str:
    """Collective (every rank calls it): ``root/iter_%07d`` (or ``release``) in torch_dist
    format, written into a staging directory that rank 0 renames into place before moving the
    tracker file -- a crash never leaves a checkpoint that looks complete.

    ``common``: the same picklable dict on every rank (args, scheduler state, counters...),
    stored in common.pt. ``rank_state``: this rank's own object (RNG states), gathered over
    the data-parallel group and restored by a run with the same TP/PP/DP."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from .layout import CHECKPOINT_VERSION, iteration_dirname
    from .save import begin_save, commit_save, staging_dir

    common = dict(common or {})
    clash = {"model", "optimizer", RANK_STATE_KEY, LAYOUT_KEY, ADAM_STEPS_KEY} & set(common) | \
        {k for k in common if k.startswith("model")}
    if clash:
        raise ValueError(f"common state may not use the keys {sorted(clash)}")
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        begin_save(root, iteration)
    dist.barrier()
    staging = staging_dir(root, iteration)
    state = sharded_training_state(model_chunks, optimizer, is_loading=False)
    if optimizer is not None:
        common[ADAM_STEPS_KEY] = [adam_step(o) for o in sub_optimizers(optimizer)]
    if rank_state is not None:
        gathered = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(gathered, rank_state, group=ps.get_data_parallel_group())
        state[RANK_STATE_KEY] = _rank_object(gathered)
    state.update(common)
    state.setdefault("checkpoint_version", CHECKPOINT_VERSION)
    state["iteration"] = 0 if iteration == "release" else int(iteration)
    state[LAYOUT_KEY] = _layout()
    dist_checkpointing.save(state, staging)  # torch_dist strategy; ends with a barrier
    if dist.get_rank() == 0:
        commit_save(root, iteration)
    dist.barrier()
    return os.path.join(root, iteration_dirname(iteration))


@torch.no_grad()  # main params may be views of the model's parameters
def _load_optimizer(optimizer, state, steps) -> None:
    """optimizer.load_state_dict, with the distributed optimizer's parameter state loaded
    while torch Adam's per-parameter 'step' is set aside (its load copies every live key
    and the saved state has no step), then every step set to the saved one."""
    subs = sub_optimizers(optimizer)
    states = [state] if len(subs) == 1 else [v for _, v in sorted(state.items())]
    for opt, sd, step in zip(subs, states, steps or [None] * len(subs)):
        if is_distributed(opt) and "param_state" in sd:
            sd = dict(sd)
            param_state, kind = sd.pop("param_state"), sd.pop("param_state_sharding_type")
            opt.load_state_dict(sd)
            with step_set_aside(opt):
                getattr(opt, f"load_parameter_state_from_{kind}")(param_state)
        else:
            opt.load_state_dict(sd)
        resync_adam_step(opt, step)


def load_training_checkpoint(path: str, model_chunks, optimizer=None, iteration=None,
                             load_rank_state: bool = True) -> dict:
    """Collective: load a torch_dist checkpoint saved with any TP/PP into this run's model
    chunks (and optimizer). Returns the common state, plus ``rank_state`` (this DP rank's
    object) when the checkpoint has one and was saved with this run's TP/PP/DP, else None."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from .layout import find_checkpoint

    ckpt = find_checkpoint(path, iteration)
    if ckpt.format != FORMAT:
        raise ValueError(f"{ckpt.path}: not a torch_dist checkpoint (per-rank files); load it "
                         f"with checkpoint.load_model_shards")
    common = read_common(ckpt.path)
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    state = sharded_training_state(chunks, optimizer, is_loading=True)
    same_layout = common.get(LAYOUT_KEY) == _layout()
    has_rank_state = any(k.startswith(RANK_STATE_KEY + "/") for k in DistFile(ckpt.path)
                         .metadata.state_dict_metadata)
    if load_rank_state and same_layout and has_rank_state:
        state[RANK_STATE_KEY] = _rank_object(None)
    with torch.serialization.safe_globals(safe_globals()):  # megatron-core's weights_only loads
        loaded = dist_checkpointing.load(state, ckpt.path)
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        _load_optimizer(optimizer, loaded["optimizer"], common.get(ADAM_STEPS_KEY))
    rank_state = loaded.get(RANK_STATE_KEY)
    out = {k: v for k, v in common.items() if k not in (LAYOUT_KEY, ADAM_STEPS_KEY)}
    out["rank_state"] = rank_state[ps.get_data_parallel_rank()] if rank_state else None
    out["saved_layout"] = common.get(LAYOUT_KEY)
    return out
