"""Training checkpoints in the Megatron layout (megatron_patch.checkpoint;
docs/checkpoint-layout.md).

Per (TP rank, PP rank), written by data-parallel rank 0 into the staging directory::

    mp_rank_XX[_YYY]/model_optim_rng.pt   model (TE names), optimizer, opt_param_scheduler,
                                          rng_state (one per DP rank), args, iteration,
                                          checkpoint_version, megatron_patch (counters)
    mp_rank_XX[_YYY]/distrib_optim.pt     DO=true: the sharded Adam state and fp32 main params
                                          gathered over the DP group (Megatron-LM's file)

then rank 0 renames the staging directory to iter_%07d and moves the tracker file last, so
a crash mid-save never leaves a checkpoint that looks complete.

megatron-core 0.16.1 without TE/apex (torch Adam) needs three repairs around the
distributed optimizer, all here: ``DistributedOptimizer.state_dict()`` asserts before the
first step (no per-parameter state yet); ``load_state_dict`` gives every parameter the SAME
``step`` tensor object, so after a resume each Adam update bumps it once per parameter and
the bias correction drifts (the resumed run differs from the uninterrupted one); and the
parameter-state load copies every key of the live state (``step`` included) from a file
that holds only param/exp_avg/exp_avg_sq. We save the step explicitly, keep ``step`` aside
during the parameter-state load, and give each parameter its own step tensor afterwards
(tests/test_train_parallel.py and test_train_resume.py check resumes bit for bit).

A checkpoint of another layout (TP/PP/VP/first-stage split, DO on/off; MP_RESUME_FROM)
resumes too: weights through the checkpoint reader, Adam's state through
optimizer_reshard.py; the RNG state then stays this run's (its model-parallel streams belong
to ranks that no longer exist -- Megatron-LM drops it after a TP/PP change as well).

With OPTIMIZER_OFFLOAD the distributed optimizer's inner optimizer is megatron-core's
HybridDeviceOptimizer: Adam's state lives in its sub-optimizers (host and device), keyed by
their own copies of the parameters. It saves in the same files and format (so a run may
resume with the switch on or off), its parameter groups without the optimizer classes
megatron-core keeps in them (a checkpoint holds tensors and plain values only). Loading goes
through the model-space route of optimizer_reshard.py, which copies into the live tensors
in place: megatron-core's own load path replaces them (and first takes a step with random
gradients to create them), which leaves the host copies stale.
"""
from __future__ import annotations

import os
import random
import signal
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_patch import checkpoint as ckpt_lib
from megatron_patch.checkpoint.optimizer_state import (
    adam_step, is_distributed, is_hybrid, materialize_adam_state, resync_adam_step,
    step_set_aside, sub_optimizers)
from megatron_patch.fsutil import atomic_write_json, sync_copy
from megatron_patch.training.config import TrainingStopped
from megatron_patch.models.llama import mapping
from megatron_patch.training import optimizer_reshard
from megatron_patch.training.config import ConfigError

DISTRIB_OPTIM_FILENAME = "distrib_optim.pt"


# ---- RNG -----------------------------------------------------------------------------------
def rng_state() -> dict:
    # numpy's state as (name, keys tensor, pos, has_gauss, cached_gaussian): a numpy array
    # would need numpy's unpickling globals, and checkpoints load with weights_only=True
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"random_rng_state": random.getstate(),
             "np_rng_state": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                              int(has_gauss), float(cached)),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    name, keys, pos, has_gauss, cached = state["np_rng_state"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos,
                         has_gauss, cached))
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


# ---- optimizer state (the distributed-optimizer repairs) ---------------------------------
def optimizer_state_dict(optimizer) -> dict:
    """{'optimizers': [state dict per chained optimizer], 'adam_steps': [...]}."""
    out = []
    steps = []
    for opt in sub_optimizers(optimizer):
        if is_distributed(opt) and adam_step(opt) is None:
            # DistributedOptimizer.state_dict() asserts on an empty state (before the first
            # successful step) and its parameter-state gather needs exp_avg/exp_avg_sq
            materialize_adam_state(opt)
        steps.append(adam_step(opt))
        sd = opt.state_dict()
        if is_hybrid(opt):
            _drop_classes(sd)
        out.append(sd)
    return {"optimizers": out, "adam_steps": steps}


def _drop_classes(state_dict: dict) -> None:
    """HybridDeviceOptimizer keeps its optimizer classes in every parameter group (its
    constructor defaults): not checkpoint material, and a class makes the file unloadable
    with weights_only. They come from the run's configuration on resume."""
    for group in state_dict.get("optimizer", {}).get("param_groups", []):
        for key in [k for k, v in group.items() if isinstance(v, type)]:
            del group[key]


@torch.no_grad()  # main params may be views of the model's leaf params (fp32 + DO)
def load_optimizer_state(optimizer, state: dict, distrib_files: Optional[list]) -> None:
    subs = sub_optimizers(optimizer)
    sds = state["optimizers"]
    if len(sds) != len(subs):
        raise ValueError(f"checkpoint has {len(sds)} optimizers, this run {len(subs)}")
    for i, (opt, sd) in enumerate(zip(subs, sds)):
        step = state["adam_steps"][i]
        if is_distributed(opt):
            opt.load_state_dict(sd)
            # load_parameter_state copies every key of the live per-parameter state from the
            # file, which holds param/exp_avg/exp_avg_sq only: keep 'step' aside meanwhile.
            with step_set_aside(opt):
                path = distrib_files[i] if distrib_files else None
                param_state = None
                if opt.data_parallel_group.rank() == 0:
                    param_state = ckpt_lib.safe_torch_load(path)
                    if isinstance(param_state, list):  # ChainedOptimizer wrote a list
                        param_state = param_state[i]
                opt.load_parameter_state_from_dp_zero(param_state)
        else:
            opt.load_state_dict(sd)
        resync_adam_step(opt, step)


# ---- save -----------------------------------------------------------------------------------
def _model_states(chunks) -> list:
    out = []
    for c in chunks:
        sd = c.module.state_dict() if hasattr(c, "module") else c.state_dict()
        sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state") and v is not None}
        out.append(mapping.to_te_names(sd))
    return out


def _rank_file(root_or_staging: str) -> str:
    return ckpt_lib.checkpoint_file(root_or_staging, ps.get_tensor_model_parallel_rank(),
                                    ps.get_pipeline_model_parallel_rank(),
                                    ps.get_pipeline_model_parallel_world_size())


def _distrib_files(rank_file: str, n: int) -> list:
    d = os.path.dirname(rank_file)
    return [os.path.join(d, DISTRIB_OPTIM_FILENAME if i == 0 else f"distrib_optim_{i}.pt")
            for i in range(n)]


def count_nonfinite_weights(chunks) -> int:
    """Non-finite values in the model weights, summed over every rank (collective)."""
    local = sum(int((~torch.isfinite(p.detach())).sum()) for c in chunks
                for p in c.parameters())
    t = torch.tensor([local], dtype=torch.int64, device=next(chunks[0].parameters()).device)
    dist.all_reduce(t)
    return int(t.item())


def _training_args(run, iteration: int):
    """The ``args`` Namespace of a training checkpoint (Megatron-LM's names)."""
    cfg, counters, par = run.cfg, run.counters(), run.cfg.parallel
    return ckpt_lib.make_args(
        run.arch, par.tp, par.pp, cfg.precision.dtype, par.vp, par.pp0_layers,
        iteration=iteration, consumed_train_samples=counters["consumed_train_samples"],
        consumed_valid_samples=counters["consumed_valid_samples"],
        train_iters=cfg.optim.train_iters, micro_batch_size=cfg.data.micro_batch_size,
        global_batch_size=cfg.data.global_batch_size, seq_length=cfg.data.seq_len,
        lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
        use_distributed_optimizer=cfg.optim.distributed_optimizer,
        sequence_parallel=par.sequence_parallel, seed=cfg.seed)


def _save_dist_checkpoint(run, iteration: int) -> str:
    """MP_CKPT_FORMAT=torch_dist: megatron-core dist_checkpointing (model, optimizer, and
    the state every rank shares; each DP rank's RNG state gathered), staged and renamed
    like the per-rank format, then the companions."""
    from megatron_patch.checkpoint import dist_format
    counters = run.counters()
    common = {"args": _training_args(run, iteration), "iteration": iteration,
              "opt_param_scheduler": run.scheduler.state_dict(),
              "num_floating_point_operations_so_far": counters["flops"],
              "megatron_patch": {**counters, "config": run.cfg.to_dict()}}
    final = dist_format.save_training_checkpoint(run.cfg.checkpoint_dir, iteration, run.chunks,
                                                 run.optimizer, common=common,
                                                 rank_state=rng_state())
    if dist.get_rank() == 0:
        write_companions(run)
    dist.barrier()
    return final


def save_checkpoint(run, iteration: int) -> str:
    """Collective: every rank calls it. Returns the final iteration directory. Weights with
    NaN/Inf are never written: training stops instead (TrainingStopped)."""
    cfg = run.cfg
    bad = count_nonfinite_weights(run.chunks)
    if bad:
        raise TrainingStopped(f"the weights hold {bad} NaN/Inf values at iteration {iteration}"
                              f" (fp16 overflow or a too-high LR={cfg.optim.lr:g}); checkpoint "
                              f"not written, stopping")
    if cfg.checkpoint.format == ckpt_lib.DIST_FORMAT:
        return _save_dist_checkpoint(run, iteration)
    root = cfg.checkpoint_dir
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        ckpt_lib.begin_save(root, iteration)
    dist.barrier()
    staging = ckpt_lib.staging_dir(root, iteration)
    rank_file = _rank_file(staging)
    # one writer per (TP, PP) rank: context-parallel ranks hold the same parameters and
    # optimizer state (CP does not change the checkpoint layout)
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    if dp_rank == 0:
        os.makedirs(os.path.dirname(rank_file), exist_ok=True)
    # RNG state of every DP rank (Megatron-LM keeps a list indexed by DP rank)
    dp_group = ps.get_data_parallel_group()
    rngs = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(rngs, rng_state(), group=dp_group)
    opt_state = optimizer_state_dict(run.optimizer)
    subs = sub_optimizers(run.optimizer)
    if any(is_distributed(o) for o in subs):
        files = _distrib_files(rank_file, len(subs))
        dist.barrier()  # the directory exists before DP rank 0 writes into it
        for opt, f in zip(subs, files):
            if is_distributed(opt):
                state = opt.get_parameter_state_dp_zero()
                if opt.data_parallel_group.rank() == 0:
                    ckpt_lib.save_rank_file(f, state)
    if dp_rank == 0:
        counters = run.counters()
        state = ckpt_lib.checkpoint_state(
            _model_states(run.chunks), iteration, _training_args(run, iteration),
            optimizer=opt_state, opt_param_scheduler=run.scheduler.state_dict(),
            rng_state=rngs, num_floating_point_operations_so_far=counters["flops"],
            megatron_patch={**counters, "config": cfg.to_dict(),
                            "optimizer_index": optimizer_reshard.optimizer_index(
                                run.chunks, run.optimizer)})
        ckpt_lib.save_rank_file(rank_file, state)
    if cfg.checkpoint.kill_in_save_iter == iteration:  # test hook: a crash mid-save
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    final = os.path.join(root, ckpt_lib.iteration_dirname(iteration))
    if rank == 0:
        ckpt_lib.commit_save(root, iteration)
        write_companions(run)
    dist.barrier()
    return final


def write_companions(run) -> None:
    """config.json (the model's HF config) and the tokenizer files next to the checkpoints,
    so the converter (mg2hf, MODEL_SIZE auto) and a following SFT run find them. Each is
    written atomically and re-copied when it differs from its source (a crash during an
    earlier copy must not leave a cut tokenizer.json behind for good)."""
    root = run.cfg.checkpoint_dir
    cfg_path = os.path.join(root, "config.json")
    if not os.path.exists(cfg_path):
        atomic_write_json(cfg_path, run.arch.to_hf_config())
    from megatron_patch.training.data_setup import tokenizer_dir
    try:
        src = tokenizer_dir(run.cfg)
    except ValueError:
        src = None
    if src is None:
        return
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json",
                                                    "generation_config.json"):
            if os.path.isfile(os.path.join(src, name)):
                sync_copy(os.path.join(src, name), os.path.join(root, name))


# ---- load -----------------------------------------------------------------------------------
def find_resume(root: str, resume_from: Optional[str] = None, warn=print):
    """The latest complete, readable checkpoint under the run's checkpoint dir; when there
    is none, the one ``resume_from`` (MP_RESUME_FROM) names; else None. Newer checkpoints
    that are cut or incomplete (a crash, a full disk, a bad tracker file) are passed over
    with one warning line each."""
    if os.path.isdir(root):
        try:
            found = ckpt_lib.find_checkpoint(root)
        except FileNotFoundError as e:
            found = None
            if ckpt_lib.list_iterations(root) or os.path.exists(
                    os.path.join(root, ckpt_lib.TRACKER_FILENAME)):
                warn(f"warning: no readable checkpoint to resume from: {e}")
        if found is not None:
            for it, why in found.skipped:
                where = ckpt_lib.iteration_dirname(it) if it is not None else \
                    ckpt_lib.TRACKER_FILENAME
                warn(f"warning: skipping {os.path.join(root, where)}: {why}; resuming from "
                     f"{found.path}")
            if found.iteration != "release":
                return found
    if resume_from is None:
        return None
    try:
        found = ckpt_lib.find_checkpoint(resume_from)
    except FileNotFoundError as e:
        raise ConfigError(f"MP_RESUME_FROM={resume_from!r} is not valid: {e}") from None
    if found.iteration == "release":
        raise ConfigError(f"MP_RESUME_FROM={resume_from!r} is not valid: it holds a release "
                          "checkpoint (weights only); give it as PRETRAIN_CHECKPOINT_PATH")
    return found


def _saved_layout(found) -> tuple:
    """(TP, PP, VP, MP_PP0_LAYERS, DO) a training checkpoint was saved with."""
    state = ckpt_lib.load_rank_file(found.file(0, 0), mmap=True)
    args = state.get("args")
    vp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    pp0 = getattr(args, "decoder_first_pipeline_num_layers", None) if found.pp > 1 else None
    return (found.tp, found.pp, vp if vp and vp > 1 else None, pp0,
            bool(getattr(args, "use_distributed_optimizer", False)))


def _run_layout(cfg) -> tuple:
    p = cfg.parallel
    return (p.tp, p.pp, p.vp, p.pp0_layers if p.pp > 1 else None,
            cfg.optim.distributed_optimizer)


def load_resume_state(run, found) -> tuple:
    """Load model weights of ``found`` into run.chunks (re-sharded when it was saved in
    another layout); return (this rank's file state, where the optimizer state comes from):
    the rank file's path for the saved layout, else ``found`` itself (the optimizer is loaded
    by ``restore_training_state`` once it exists)."""
    ckpt_lib.load_model_shards(found.root, run.chunks, arch=run.arch,
                               iteration=found.iteration)
    # the offloaded optimizer loads through the model-space route (module docstring)
    if _saved_layout(found) == _run_layout(run.cfg) and run.cfg.optim.offload == "false":
        f = found.file(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
        return ckpt_lib.load_rank_file(f, mmap=False), f
    # another layout: counters, scheduler and Adam's step are the same in every rank file
    # (mmap: its tensors are read only if this rank needs them)
    return ckpt_lib.load_rank_file(found.file(0, 0), mmap=True), found


def restore_training_state(run, state: dict, source) -> None:
    """Optimizer, scheduler and RNG from a checkpoint; ``source`` as load_resume_state
    returned it."""
    if isinstance(source, str):
        subs = sub_optimizers(run.optimizer)
        files = _distrib_files(source, len(subs)) if any(is_distributed(o) for o in subs) \
            else None
        load_optimizer_state(run.optimizer, state["optimizer"], files)
    else:
        _restore_resharded_optimizer(run, state, source)
    run.scheduler.load_state_dict(state["opt_param_scheduler"])
    rngs = state.get("rng_state") or []
    saved_tp_pp = (source.tp, source.pp) if not isinstance(source, str) else None
    if saved_tp_pp not in (None, (run.cfg.parallel.tp, run.cfg.parallel.pp)):
        # the model-parallel RNG streams belong to TP/PP ranks that no longer exist: keep
        # this run's seeding (Megatron-LM ignores the RNG state after a TP/PP change too)
        return
    if rngs:
        dp_rank = ps.get_data_parallel_rank()
        set_rng_state(rngs[dp_rank] if dp_rank < len(rngs) else rngs[0])


def restore_dist_training_state(run, found) -> dict:
    """A torch_dist checkpoint (any TP/PP/DP it was saved with): model, optimizer,
    scheduler, and -- in the same layout -- this DP rank's RNG state. Returns the common
    state (iteration, megatron_patch counters) for the caller's counters."""
    from megatron_patch.checkpoint import dist_format
    common = dist_format.load_training_checkpoint(found.root, run.chunks, run.optimizer,
                                                  iteration=found.iteration)
    run.scheduler.load_state_dict(common["opt_param_scheduler"])
    if common.get("rank_state") is not None:
        set_rng_state(common["rank_state"])
    return common


def _restore_resharded_optimizer(run, state: dict, found) -> None:
    """Adam's state from a checkpoint of another layout, re-cut for this rank (the loss
    scale too: it is the same on every rank)."""
    scaler = optimizer_reshard.saved_grad_scaler(state)
    for opt in sub_optimizers(run.optimizer):
        if scaler and getattr(opt, "grad_scaler", None) is not None:
            opt.grad_scaler.load_state_dict(scaler)
    step = optimizer_reshard.saved_step(state)
    if step is None:  # saved before the first successful step: Adam has no state yet
        return
    par = run.cfg.parallel
    states = optimizer_reshard.read_model_space(
        found, lambda rank_file, i: _distrib_files(rank_file, i + 1)[i], run.arch,
        par.tp, par.pp, ps.get_tensor_model_parallel_rank(),
        ps.get_pipeline_model_parallel_rank(), par.vp, par.pp0_layers if par.pp > 1 else None)
    optimizer_reshard.apply_model_space(run.optimizer, run.chunks, states,
                                        materialize_adam_state)
    for opt in sub_optimizers(run.optimizer):
        resync_adam_step(opt, step)
