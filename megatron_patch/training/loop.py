"""The training loop on megatron-core: setup, train, evaluate, checkpoint.

``train(cfg)`` runs one training job in an initialised process group (torchrun env or the
test harness): model-parallel groups, the Llama model chunks in megatron-core DDP, the
megatron-core optimizer (distributed optimizer with DO=true), cosine LR with warmup to
MIN_LR (megatron-core's OptimizerParamScheduler, counted in samples like Megatron-LM),
num_microbatches from megatron-core's calculator (GBS / (MBS x DP)), the pipeline
schedules from get_forward_backward_func, gradient clipping, fp16 loss scaling with
skipped iterations, NaN/Inf detection, evaluation, checkpoints and automatic resume.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_patch.training.config import ConfigError, TrainConfig, blend, check_model_shape


@dataclass
class Run:
    cfg: TrainConfig
    arch: object
    chunks: list
    optimizer: object
    scheduler: object
    tconfig: object
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_iters: int = 0
    nan_iters: int = 0
    flops: float = 0.0
    history: list = field(default_factory=list)   # per-iteration metrics (this process)
    evals: list = field(default_factory=list)

    def counters(self) -> dict:
        return {"iteration": self.iteration,
                "consumed_train_samples": self.consumed_train_samples,
                "consumed_valid_samples": self.consumed_valid_samples,
                "skipped_iters": self.skipped_iters, "nan_iters": self.nan_iters,
                "flops": self.flops}


# ---- setup ---------------------------------------------------------------------------------
def resolve_arch(cfg: TrainConfig):
    from megatron_patch.models.llama import get_preset
    from megatron_patch.training.config import config_json_for
    if cfg.model_size != "auto":
        return get_preset(cfg.generation, cfg.model_size)
    from megatron_patch import checkpoint as ckpt_lib
    from megatron_patch.models.llama import LlamaArch
    found = ckpt_lib.find_checkpoint(cfg.pretrain_checkpoint)
    arch = ckpt_lib.checkpoint_arch(found)
    if arch is None:
        path = config_json_for(cfg.pretrain_checkpoint)
        if path is None:
            raise ConfigError(f"MODEL_SIZE='auto' is not valid: no config.json next to "
                              f"{cfg.pretrain_checkpoint} and no model shape in its args")
        arch = LlamaArch.from_hf_config(path, generation=cfg.generation)
    return arch


def tokenizer_dir(cfg: TrainConfig) -> Optional[str]:
    """MP_TOKENIZER, else tokenizer files next to PRETRAIN_CHECKPOINT_PATH (or above it),
    else the tokenizer an SFT idxmap was built with."""
    cands = [cfg.tokenizer]
    if cfg.pretrain_checkpoint:
        cands += [cfg.pretrain_checkpoint, os.path.dirname(os.path.normpath(cfg.pretrain_checkpoint))]
    if cfg.sft and cfg.dataset_type == "idxmap":
        import json
        meta = f"{cfg.data_path[0]}_sft_meta.json"
        if os.path.isfile(meta):
            with open(meta, encoding="utf-8") as f:
                cands.append(json.load(f).get("tokenizer"))
    for c in cands:
        if c and os.path.isdir(c) and any(os.path.isfile(os.path.join(c, n)) for n in
                                          ("tokenizer.json", "tokenizer.model",
                                           "tokenizer_config.json")):
            return c
    if cfg.tokenizer:
        raise ConfigError(f"MP_TOKENIZER={cfg.tokenizer!r} is not valid: not a tokenizer "
                          "directory (tokenizer.json / tokenizer.model)")
    return None


def build_data(cfg: TrainConfig, arch, dp_size: int, dp_rank: int, consumed: int, note=print):
    """(train micro-batch iterator factory, valid dataset or None, sample fn, seq len)."""
    from megatron_patch.training import batches
    if cfg.sft:
        from megatron_patch.data.sft_dataset import SFTDataset
        from megatron_patch.tokenizer import load_tokenizer
        tdir = tokenizer_dir(cfg)
        if tdir is None:
            raise ConfigError("SFT needs the tokenizer: put its files next to "
                              "PRETRAIN_CHECKPOINT_PATH or set MP_TOKENIZER=<HF tokenizer dir>")
        tok = load_tokenizer(tdir)
        if tok.vocab_size > arch.vocab_size:
            raise ConfigError(f"tokenizer {tdir} has {tok.vocab_size} tokens, the model's "
                              f"vocabulary {arch.vocab_size}")
        verbose = dist.get_rank() == 0
        train = SFTDataset(cfg.data_path[0], tok, cfg.pad_len, cfg.dataset_type, cfg.generation,
                           cfg.sft_packing, verbose=verbose)
        valid = None
        if cfg.valid_data_path:
            valid = SFTDataset(cfg.valid_data_path[0], tok, cfg.pad_len, cfg.dataset_type,
                               cfg.generation, cfg.sft_packing, verbose=verbose)
        train_stream = batches.CyclicShuffled(train, cfg.seed)
        valid_stream = batches.CyclicShuffled(valid, cfg.seed, shuffle=False) if valid else None
        return train_stream, valid_stream, batches.sft_sample, cfg.pad_len
    from megatron_patch.data.pretrain import build_pretrain_datasets, default_eod
    tpaths, tweights = blend(cfg.data_path)
    vpaths, vweights = blend(cfg.valid_data_path) if cfg.valid_data_path else (None, None)
    n_train = cfg.train_iters * cfg.global_batch_size
    n_valid = max(cfg.eval_iters, 1) * cfg.global_batch_size
    train, valid = build_pretrain_datasets(
        tpaths, tweights, vpaths, vweights, cfg.seq_len, cfg.seed, (n_train, n_valid),
        arch.vocab_size, default_eod(cfg.generation), cfg.data_split,
        cache_dir=os.path.join(cfg.output_base, "data_cache"), note=note)
    return train, valid, batches.pretrain_sample, cfg.seq_len


def _optimizer_config_kwargs(cfg):
    return dict(lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                clip_grad=cfg.clip_grad, use_distributed_optimizer=cfg.distributed_optimizer,
                adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
                initial_loss_scale=cfg.initial_loss_scale)


def setup(cfg: TrainConfig, log=print) -> tuple:
    """Model chunks, optimizer, scheduler; weights from this run's latest checkpoint (with
    optimizer, scheduler, RNG and counters) or from PRETRAIN_CHECKPOINT_PATH. Returns a Run."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator, init_num_microbatches_calculator)
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_patch import checkpoint as ckpt_lib
    from megatron_patch import parallel
    from megatron_patch.models.llama import ParallelSettings, transformer_config
    from megatron_patch.training import checkpointing
    from megatron_patch.training.model_setup import build_model_chunks, build_optimizer

    world = dist.get_world_size()
    if world % cfg.model_parallel_size:
        raise ConfigError(f"TP={cfg.tp} x PP={cfg.pp} x CP={cfg.cp} = {cfg.model_parallel_size} "
                          f"does not divide the world size {world}")
    dp = world // cfg.model_parallel_size
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise ConfigError(f"GLOBAL_BATCH_SIZE={cfg.global_batch_size} is not valid: must be a "
                          f"multiple of BATCH_SIZE={cfg.micro_batch_size} x data-parallel size "
                          f"{dp}")
    nmb = cfg.global_batch_size // (cfg.micro_batch_size * dp)
    if cfg.vp and nmb % cfg.pp:
        raise ConfigError(f"GLOBAL_BATCH_SIZE={cfg.global_batch_size} is not valid: with "
                          f"MP_VP the {nmb} micro-batches per step must be a multiple of PP="
                          f"{cfg.pp}")
    parallel.initialize_model_parallel(tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, vp=cfg.vp,
                                       seed=cfg.seed)
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(dist.get_rank(), None, cfg.global_batch_size,
                                     cfg.micro_batch_size, dp, False)

    arch = resolve_arch(cfg)
    check_model_shape(cfg, arch)
    overrides = {"init_method_std": cfg.init_method_std}
    precision = cfg.precision
    if precision == "fp8":  # Transformer Engine only (config.py refuses fp8 without TE)
        precision = "bf16"
        overrides.update(fp8="hybrid", fp8_margin=0, fp8_amax_history_len=1024,
                         fp8_amax_compute_algo="max")
    from megatron_patch.backends import active_backend
    from megatron_patch.backends.cuda import te_available
    if active_backend().name == "cuda" and te_available():
        # FL: Transformer Engine's flash attention (true) or its cuDNN fused attention
        # (false), like Pai's NVTE_FLASH_ATTN/NVTE_FUSED_ATTN switch. Without TE the SDPA
        # core attention is used (flash kernels on CUDA when available).
        from megatron.core.transformer.enums import AttnBackend
        overrides["attention_backend"] = AttnBackend.flash if cfg.flash_attn else AttnBackend.fused
    tconfig = transformer_config(
        arch, ParallelSettings(tp=cfg.tp, pp=cfg.pp, cp=cfg.cp,
                               sequence_parallel=cfg.sequence_parallel, vp=cfg.vp,
                               pp0_layers=cfg.pp0_layers),
        precision, recompute=cfg.recompute, recompute_num_layers=cfg.recompute_num_layers,
        **overrides)
    chunks = build_model_chunks(arch, tconfig, use_distributed_optimizer=cfg.distributed_optimizer)

    # weights: resume from this run's own latest checkpoint, else the pretrained one
    found = checkpointing.find_resume(cfg.checkpoint_dir)
    resume = None
    if found is not None:
        resume = checkpointing.load_resume_state(
            Run(cfg, arch, chunks, None, None, tconfig), found)
        log(f"resuming from {found.path} (iteration {found.iteration})")
    elif cfg.pretrain_checkpoint:
        got = ckpt_lib.load_model_shards(cfg.pretrain_checkpoint, chunks, arch=arch)
        log(f"loaded pretrained weights from {got.path} (TP={got.tp} PP={got.pp} -> "
            f"TP={cfg.tp} PP={cfg.pp})")
    else:
        log("training from scratch (PRETRAIN_CHECKPOINT_PATH=none)")

    # the optimizer copies main params from the (loaded) model params
    optimizer = build_optimizer(chunks, tconfig, **_optimizer_config_kwargs(cfg))
    gbs = cfg.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_iters * gbs, lr_decay_steps=cfg.lr_decay_iters * gbs,
        lr_decay_style="cosine", start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters * gbs, wd_incr_style="constant")

    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    no_sync = [c.no_sync for c in chunks]
    tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    run = Run(cfg, arch, chunks, optimizer, scheduler, tconfig)
    if resume is not None:
        state, rank_file = resume
        checkpointing.restore_training_state(run, state, rank_file)
        c = state.get("megatron_patch", {})
        run.iteration = int(state["iteration"])
        run.consumed_train_samples = int(c.get("consumed_train_samples",
                                               run.iteration * gbs))
        run.consumed_valid_samples = int(c.get("consumed_valid_samples", 0))
        run.skipped_iters = int(c.get("skipped_iters", 0))
        run.nan_iters = int(c.get("nan_iters", 0))
        run.flops = float(c.get("flops", 0.0))
    return run


# ---- one step --------------------------------------------------------------------------------
def _finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


def optimizer_step(optimizer, clip_grad: float):
    """megatron-core's step split in two so a non-finite gradient norm skips the update
    (fp32/bf16) instead of writing NaN into the weights. Returns (updated, grad_norm, nan)."""
    from megatron.core.optimizer import clip_grads
    if optimizer.prepare_grads():       # fp16: inf/nan found, loss scale lowered
        return False, None, False
    grad_norm = optimizer.get_grad_norm()
    if not _finite(grad_norm):
        return False, float(grad_norm), True
    if clip_grad > 0.0:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            if getattr(opt, "is_stub_optimizer", False):
                continue
            params = opt.get_parameters()
            if params:
                clip_grads.clip_grad_by_total_norm_fp32(
                    params, max_norm=clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), float(grad_norm), False


def _reported_loss(losses: list) -> Optional[torch.Tensor]:
    if not losses:
        return None
    return torch.stack([x["lm loss"].float().reshape(()) for x in losses]).mean()


def _broadcast_from_last_stage(value: Optional[torch.Tensor]) -> float:
    """The loss lives on the last pipeline stage: share it with every rank."""
    from megatron.core import parallel_state as ps
    t = torch.zeros((), dtype=torch.float32) if value is None else value.detach().float().cpu()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        from megatron_patch.backends import active_backend
        t = t.to(active_backend().device(int(os.environ.get("LOCAL_RANK", 0))))
        dist.broadcast(t, ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return float(t.item())


def train_step(run: Run, data_iterator, seq_len: int):
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch.training.forward_step import forward_step
    for c in run.chunks:
        c.zero_grad_buffer()
    run.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=run.chunks,
        num_microbatches=get_num_microbatches(), seq_length=seq_len,
        micro_batch_size=run.cfg.micro_batch_size, forward_only=False)
    loss = _broadcast_from_last_stage(_reported_loss(losses))
    updated, grad_norm, nan_grad = optimizer_step(run.optimizer, run.cfg.clip_grad)
    if updated:
        run.scheduler.step(increment=run.cfg.global_batch_size)
    return loss, updated, grad_norm, nan_grad or not math.isfinite(loss)


def evaluate(run: Run, valid, to_sample, seq_len: int) -> Optional[float]:
    """Mean lm loss over the first eval_iters global batches of the validation set (the same
    batches at every evaluation, so the values are comparable)."""
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch.training import batches
    from megatron_patch.training.forward_step import forward_step
    cfg = run.cfg
    if valid is None or cfg.eval_iters == 0:
        return None
    it = batches.MicroBatches(valid, to_sample, cfg.global_batch_size, cfg.micro_batch_size,
                              ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())
    data = batches.Replay(it, len(run.chunks)).views() if len(run.chunks) > 1 else it
    for c in run.chunks:
        c.eval()
    values = []
    with torch.no_grad():
        for _ in range(cfg.eval_iters):
            losses = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=data, model=run.chunks,
                num_microbatches=get_num_microbatches(), seq_length=seq_len,
                micro_batch_size=cfg.micro_batch_size, forward_only=True)
            values.append(_broadcast_from_last_stage(_reported_loss(losses)))
    for c in run.chunks:
        c.train()
    run.consumed_valid_samples += cfg.eval_iters * cfg.global_batch_size
    return sum(values) / len(values)


# ---- the loop -------------------------------------------------------------------------------
def train(cfg: TrainConfig, log_to_file: Optional[bool] = None) -> Run:
    """Train according to cfg in the current process group. Returns the Run (its
    ``history`` holds this process's per-iteration metrics)."""
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from megatron_patch import parallel
    from megatron_patch.training import batches, checkpointing
    from megatron_patch.training.train_log import (TrainLogger, iteration_line,
                                                   model_flops_per_token)

    parallel.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    is_logger = rank == world - 1
    if log_to_file is None:
        log_to_file = os.environ.get("MP_LOG_TEED") != "1"
    logger = TrainLogger(is_logger, cfg.tensorboard_dir, cfg.log_file if log_to_file else None)
    logger.print(f"> megatron_patch training: {cfg.run_name}")
    for n in cfg.notes:
        logger.print(f"note: {n}")
    run = setup(cfg, log=logger.print)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    from megatron_patch.backends import active_backend
    logger.print(f"> world size {world} (TP={cfg.tp} PP={cfg.pp} CP={cfg.cp} DP={dp}"
                 f"{' VP=' + str(cfg.vp) if cfg.vp else ''}), backend "
                 f"{active_backend().name}, precision {cfg.precision}, "
                 f"{'distributed' if cfg.distributed_optimizer else 'plain'} optimizer, "
                 f"{dist.get_backend()} process groups; {cfg.train_iters} iterations "
                 f"(warmup {cfg.warmup_iters}), checkpoints in {cfg.checkpoint_dir}")

    train_ds, valid_ds, to_sample, seq_len = build_data(cfg, run.arch, dp, dp_rank,
                                                        run.consumed_train_samples,
                                                        note=logger.print)
    it = batches.MicroBatches(train_ds, to_sample, cfg.global_batch_size, cfg.micro_batch_size,
                              dp, dp_rank, consumed=run.consumed_train_samples)
    data = batches.Replay(it, len(run.chunks)).views() if len(run.chunks) > 1 else it
    padded_vocab = run.arch.padded_vocab_size(cfg.tp)

    flops_per_iter = model_flops_per_token(run.arch, seq_len) * cfg.global_batch_size * seq_len
    tokens_per_iter = cfg.global_batch_size * seq_len
    start_iter = run.iteration
    last_saved = run.iteration if start_iter > 0 else None
    checked_ids = False
    try:
        while run.iteration < cfg.train_iters:
            if not checked_ids:  # ids must index the embedding
                peek = train_ds[run.consumed_train_samples]
                top = int((peek["tokens"] if "tokens" in peek else peek["input_ids"]).max())
                if top >= padded_vocab:
                    raise ConfigError(f"the data holds token id {top} but the model's vocabulary "
                                      f"has {run.arch.vocab_size} entries: was it tokenized for "
                                      f"another model?")
                checked_ids = True
            t0 = time.perf_counter()
            loss, updated, grad_norm, got_nan = train_step(run, data, seq_len)
            elapsed = time.perf_counter() - t0
            run.iteration += 1
            run.consumed_train_samples += cfg.global_batch_size
            if not updated:
                run.skipped_iters += 1
            if got_nan:
                run.nan_iters += 1
            run.flops += flops_per_iter
            lr = run.optimizer.param_groups[0]["lr"]
            scale = float(run.optimizer.get_loss_scale().item())
            tps = tokens_per_iter / elapsed / world
            tflops = flops_per_iter / elapsed / world / 1e12
            rec = dict(iteration=run.iteration, loss=loss, lr=lr, grad_norm=grad_norm,
                       loss_scale=scale, updated=updated, ms=elapsed * 1000, tokens_per_s=tps,
                       tflops=tflops)
            run.history.append(rec)
            if run.iteration % cfg.log_interval == 0:
                logger.print(iteration_line(
                    run.iteration, cfg.train_iters, run.consumed_train_samples,
                    run.consumed_train_samples * seq_len, elapsed * 1000, lr,
                    cfg.global_batch_size, loss, scale, grad_norm, run.skipped_iters,
                    run.nan_iters, tps, tflops))
                logger.scalars(run.iteration, {
                    "lm loss": loss if math.isfinite(loss) else None, "learning-rate": lr,
                    "batch-size": cfg.global_batch_size, "loss-scale": scale,
                    "grad-norm": grad_norm if _finite(grad_norm) else None,
                    "iteration-time": elapsed, "tokens-per-second-per-device": tps,
                    "throughput-tflops-per-device": tflops,
                    "skipped-iterations": run.skipped_iters, "nan-iterations": run.nan_iters},
                    samples=run.consumed_train_samples)
            if run.nan_iters and run.nan_iters >= 10 and got_nan:
                raise FloatingPointError(f"{run.nan_iters} iterations with NaN/Inf loss or "
                                         f"gradients; stopping (lower LR, check the data)")
            if run.iteration % cfg.eval_interval == 0 and run.iteration < cfg.train_iters:
                _eval_and_log(run, valid_ds, to_sample, seq_len, logger)
            if run.iteration % cfg.save_interval == 0 or run.iteration == cfg.train_iters:
                d = checkpointing.save_checkpoint(run, run.iteration)
                last_saved = run.iteration
                logger.print(f"saved checkpoint at iteration {run.iteration} to {d}")
        if valid_ds is not None and cfg.eval_iters and start_iter < cfg.train_iters:
            _eval_and_log(run, valid_ds, to_sample, seq_len, logger, final=True)
        if last_saved != run.iteration:
            d = checkpointing.save_checkpoint(run, run.iteration)
            logger.print(f"saved checkpoint at iteration {run.iteration} to {d}")
        logger.print(f"training done: {run.iteration} iterations, {run.skipped_iters} skipped, "
                     f"{run.nan_iters} with NaN/Inf")
    finally:
        logger.close()
        destroy_num_microbatches_calculator()
    return run


def _eval_and_log(run, valid_ds, to_sample, seq_len, logger, final=False):
    v = evaluate(run, valid_ds, to_sample, seq_len)
    if v is None:
        return
    run.evals.append((run.iteration, v))
    ppl = math.exp(min(20.0, v)) if math.isfinite(v) else float("nan")
    where = "the end of training" if final else f"iteration {run.iteration}"
    logger.print("-" * 100)
    logger.print(f" validation loss at {where} | lm loss value: {v:.6E} | lm loss PPL: "
                 f"{ppl:.6E} |")
    logger.print("-" * 100)
    logger.scalars(run.iteration, {"lm loss validation": v, "lm loss validation ppl": ppl},
                   samples=run.consumed_train_samples)
