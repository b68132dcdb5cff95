"""The Megatron checkpoint layout shared by the converter, training and evaluation.

Layout (docs/checkpoint-layout.md)::

    <root>/latest_checkpointed_iteration.txt        "release" or N (written last)
    <root>/release | iter_%07d/mp_rank_%02d[_%03d]/model_optim_rng.pt
        {"model": {megatron-core name: tensor} (or "model0", "model1"... with VP),
         "iteration": N (0 for release), "checkpoint_version": 3.0, "args": Namespace, ...}

Tensor names follow megatron-core's Transformer Engine spec (what Megatron-LM and Pai write);
``load_into`` renames for the local spec. Training adds optimizer/scheduler/RNG entries to
the same dict; readers here ignore them.

Writing: ``begin_save`` -> ``save_rank_file(checkpoint_file(staging, tp, pp, PP), state)``
per rank -> ``commit_save`` (atomic rename, tracker last). ``checkpoint_state`` builds the
dict, ``make_args`` the args. Big files can be streamed with ``StreamingTorchWriter``.

Reading: ``find_checkpoint(path)`` (latest complete, or a given iteration),
``load_model_shards(path, model_chunks)`` loads a model built for any TP/PP/VP,
``load_model_state(path, tp, pp, tp_rank, pp_rank)`` returns the state dicts,
``load_rank_file(path)`` a whole rank file (torch.load, weights_only, args allowed).
"""
from .layout import (CHECKPOINT_FILENAME, CHECKPOINT_VERSION, DIST_FORMAT, TRACKER_FILENAME,
                     CheckpointDir,
                     checkpoint_file, checkpoint_problem, find_checkpoint, iteration_dirname,
                     list_iterations, rank_dirname, read_tracker, torch_file_problem,
                     write_tracker)

# The torch-using modules load on first use: the layout alone (standard library) lets the
# launcher check PRETRAIN_CHECKPOINT_PATH without importing torch.
_LAZY = {
    "save": ("begin_save", "checkpoint_state", "commit_save", "make_args", "save_rank_file",
             "staging_dir"),
    "torch_file": ("LazyTensor", "LazyTorchFile", "StreamingTorchWriter"),
    "load": ("SAFE_GLOBALS", "FileSource", "MemorySource", "UnsafeCheckpointError",
             "checkpoint_arch", "load_into", "load_model_shards", "load_model_state",
             "load_rank_file", "read_full_tensor", "reshard_state", "safe_torch_load",
             "saved_layout", "stage_rules"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name):
    if name in _WHERE:
        import importlib
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TRACKER_FILENAME", "CHECKPOINT_FILENAME", "CHECKPOINT_VERSION", "DIST_FORMAT",
    "CheckpointDir",
    "iteration_dirname", "rank_dirname", "checkpoint_file", "read_tracker", "write_tracker",
    "list_iterations", "find_checkpoint", "checkpoint_problem", "torch_file_problem",
    "staging_dir", "begin_save", "save_rank_file", "commit_save", "make_args",
    "checkpoint_state",
    "StreamingTorchWriter", "LazyTorchFile", "LazyTensor",
    "FileSource", "MemorySource", "read_full_tensor", "saved_layout", "reshard_state",
    "stage_rules",
    "checkpoint_arch", "load_model_state", "load_model_shards", "load_into", "load_rank_file",
    "SAFE_GLOBALS", "UnsafeCheckpointError", "safe_torch_load",
]
