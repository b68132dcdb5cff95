"""Writing checkpoints atomically: every rank writes into a staging directory, then one
process renames it into place and moves the tracker file last.

Single process::

    staging = begin_save(root, 100)
    save_rank_file(checkpoint_file(staging, tp_rank, pp_rank, pp), state)
    commit_save(root, 100)

Distributed: rank 0 calls ``begin_save`` (others ``staging_dir``), barrier, every rank
saves its file, barrier, rank 0 calls ``commit_save``. A crash at any point leaves the
previous checkpoint and tracker untouched; a reader never sees a half-written directory.
"""
from __future__ import annotations

import argparse
import os
import shutil
from typing import Optional

import torch

from .layout import (CHECKPOINT_VERSION, Iteration, iteration_dirname, write_tracker)


def staging_dir(root: str, iteration: Iteration) -> str:
    """Deterministic (same on every rank) staging path for ``iteration`` under root."""
    return os.path.join(root, f".staging.{iteration_dirname(iteration)}")


def begin_save(root: str, iteration: Iteration) -> str:
    """Create an empty staging directory (removing leftovers of a crashed save)."""
    path = staging_dir(root, iteration)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def save_rank_file(path: str, state: dict) -> None:
    """torch.save ``state`` to ``path`` via a temp file and rename (creates parent dirs).

    torch.save is given a Python file, not the path: with a path its C++ writer reports a
    full disk as "basic_ios::clear: iostream error"; through a file object the write raises
    OSError(ENOSPC), re-raised here naming ``path``. The cut temp file is removed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except OSError as e:  # the file the user will look for, not our temporary name
        if e.errno is None or (e.filename and e.filename not in (tmp, path)):
            raise
        raise type(e)(e.errno, e.strerror, path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def commit_save(root: str, iteration: Iteration, update_tracker: bool = True) -> str:
    """Move the staging directory to its final name (replacing an older save of the same
    iteration) and then update the tracker. Returns the final directory."""
    src = staging_dir(root, iteration)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: nothing staged for iteration {iteration}")
    dst = os.path.join(root, iteration_dirname(iteration))
    old = None
    if os.path.exists(dst):
        old = f"{dst}.old{os.getpid()}"
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(root)
    if update_tracker:
        write_tracker(root, iteration)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_args(arch, tp: int, pp: int, precision: str = "bf16", vp: Optional[int] = None,
              pp0_layers: Optional[int] = None, **extra) -> argparse.Namespace:
    """The ``args`` entry of a checkpoint: Megatron-LM's names for the model shape and
    parallel layout (so its tools can read them) plus ``megatron_patch_arch``, the full
    LlamaArch as a dict, which makes the checkpoint self-describing for our reader."""
    ns = argparse.Namespace(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp, decoder_first_pipeline_num_layers=pp0_layers,
        num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size, num_attention_heads=arch.num_attention_heads,
        group_query_attention=arch.num_key_value_heads != arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads, kv_channels=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        padded_vocab_size=arch.padded_vocab_size(tp), make_vocab_size_divisible_by=128,
        norm_epsilon=arch.norm_eps, rotary_base=arch.rope_theta,
        position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
        untie_embeddings_and_output_weights=not arch.tie_word_embeddings,
        add_bias_linear=False, bf16=precision == "bf16", fp16=precision == "fp16",
        params_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32),
        megatron_patch_arch=arch.to_dict(),
    )
    for k, v in extra.items():
        setattr(ns, k, v)
    return ns


def checkpoint_state(model_chunks: list, iteration: Iteration, args=None, **extra) -> dict:
    """The top-level dict of a rank file: ``model`` (or ``model0``, ``model1``... with
    virtual pipeline, like Megatron-LM), ``iteration``, ``checkpoint_version``, ``args``."""
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION,
             "iteration": 0 if iteration == "release" else int(iteration)}
    if len(model_chunks) == 1:
        state["model"] = model_chunks[0]
    elif model_chunks:
        for i, sd in enumerate(model_chunks):
            state[f"model{i}"] = sd
    state.update(extra)
    return state
