"""The training loop on megatron-core: train, evaluate, checkpoint (setup in setup.py).

``train(cfg)`` runs one training job in an initialised process group (torchrun env or the
test harness): model-parallel groups, the Llama model chunks in megatron-core DDP, the
megatron-core optimizer (distributed optimizer with DO=true), cosine LR with warmup to
MIN_LR (megatron-core's OptimizerParamScheduler, counted in samples like Megatron-LM),
num_microbatches from megatron-core's calculator (GBS / (MBS x DP)), the pipeline
schedules from get_forward_backward_func, gradient clipping, fp16 loss scaling with
skipped iterations, NaN/Inf detection, evaluation, checkpoints and automatic resume.
"""
from __future__ import annotations

import collections
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_patch.training.config import ConfigError, TrainConfig, TrainingStopped
from megatron_patch.training.setup import Run, setup



class RecentCount:
    """How many marked iterations lie within the last ``window`` iterations."""

    def __init__(self, window: int):
        self.window, self.marks = window, collections.deque()

    def add(self, iteration: int) -> int:
        self.marks.append(iteration)
        while self.marks[0] <= iteration - self.window:
            self.marks.popleft()
        return len(self.marks)


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


def _schedule_shape(cfg: TrainConfig, seq_len: int):
    from megatron_patch.training.packed_seq import schedule_shape
    return schedule_shape(cfg.data.sft and cfg.data.sft_packing, seq_len,
                          cfg.data.micro_batch_size)


def train_step(run: Run, data_iterator, seq_len: int):
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch.training.forward_step import forward_step, reported_loss
    for c in run.chunks:
        c.zero_grad_buffer()
    run.optimizer.zero_grad()
    seq_length, mbs = _schedule_shape(run.cfg, seq_len)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=run.chunks,
        num_microbatches=get_num_microbatches(), seq_length=seq_length,
        micro_batch_size=mbs, forward_only=False)
    loss = _broadcast_from_last_stage(reported_loss(losses))
    updated, grad_norm, nan_grad = optimizer_step(run.optimizer, run.cfg.optim.clip_grad)
    if updated:
        run.scheduler.step(increment=run.cfg.data.global_batch_size)
    return loss, updated, grad_norm, nan_grad or not math.isfinite(loss)


def evaluate(run: Run, valid, to_sample, seq_len: int) -> Optional[float]:
    """Mean lm loss over the first eval_iters global batches of the validation set (the same
    batches at every evaluation, so the values are comparable)."""
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch.training import batches
    from megatron_patch.training.forward_step import forward_step, reported_loss
    cfg = run.cfg
    if valid is None or cfg.eval_iters == 0:
        return None
    it = batches.MicroBatches(valid, to_sample, cfg.data.global_batch_size,
                              cfg.data.micro_batch_size,
                              ps.get_data_parallel_world_size(), ps.get_data_parallel_rank())
    data = batches.Replay(it, len(run.chunks)).views() if len(run.chunks) > 1 else it
    for c in run.chunks:
        c.eval()
    values = []
    seq_length, mbs = _schedule_shape(cfg, seq_len)
    with torch.no_grad():
        for _ in range(cfg.eval_iters):
            losses = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=data, model=run.chunks,
                num_microbatches=get_num_microbatches(), seq_length=seq_length,
                micro_batch_size=mbs, forward_only=True)
            values.append(_broadcast_from_last_stage(reported_loss(losses)))
    for c in run.chunks:
        c.train()
    run.consumed_valid_samples += cfg.eval_iters * cfg.data.global_batch_size
    return sum(values) / len(values)


def cp_attention_line(run: Run) -> str:
    """Which core attention runs context parallelism, read from the built model."""
    core = next(m for c in run.chunks for n, m in c.named_modules()
                if n.endswith("core_attention"))
    name = type(core).__name__
    if name.startswith("TE"):
        return (f"Transformer Engine attention ({name}), cp_comm_type="
                f"{run.tconfig.cp_comm_type or 'p2p'}")
    return (f"{name} ({type(core).__module__}): K/V all-gathered over the CP group, "
            "causal attention by global positions")


# ---- the loop -------------------------------------------------------------------------------
def train(cfg: TrainConfig, log_to_file: Optional[bool] = None) -> Run:
    """Train according to cfg in the current process group. Returns the Run (its
    ``history`` holds this process's per-iteration metrics)."""
    from megatron.core import parallel_state as ps
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from megatron_patch import parallel
    from megatron_patch.training import batches, checkpointing
    from megatron_patch.training.data_setup import build_data
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
    par = cfg.parallel
    logger.print(f"> world size {world} (TP={par.tp} PP={par.pp} CP={par.cp} DP={dp}"
                 f"{' VP=' + str(par.vp) if par.vp else ''}), backend "
                 f"{active_backend().name}, precision {cfg.precision.dtype}, "
                 f"{'distributed' if cfg.optim.distributed_optimizer else 'plain'} optimizer, "
                 f"{dist.get_backend()} process groups; {cfg.optim.train_iters} iterations "
                 f"(warmup {cfg.optim.warmup_iters}), checkpoints in {cfg.checkpoint_dir}")
    if par.cp > 1:
        logger.print(f"> context parallelism CP={par.cp}: {cp_attention_line(run)}")

    train_ds, valid_ds, to_sample, seq_len = build_data(cfg, run.arch, note=logger.print)
    it = batches.MicroBatches(train_ds, to_sample, cfg.data.global_batch_size,
                              cfg.data.micro_batch_size,
                              dp, dp_rank, consumed=run.consumed_train_samples)
    data = batches.Replay(it, len(run.chunks)).views() if len(run.chunks) > 1 else it
    padded_vocab = run.arch.padded_vocab_size(cfg.parallel.tp)

    flops_per_iter = model_flops_per_token(run.arch, seq_len) * cfg.data.global_batch_size * seq_len
    start_iter = run.iteration
    nan_window = RecentCount(cfg.nan_window)
    last_saved = run.iteration if start_iter > 0 else None
    checked_ids = False
    try:
        while run.iteration < cfg.optim.train_iters:
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
            # tokens/s counts the samples' tokens, not SFT's padding (the FLOPs count all)
            tokens = batches.real_tokens(train_ds, run.consumed_train_samples,
                                         cfg.data.global_batch_size, seq_len)
            run.iteration += 1
            run.consumed_train_samples += cfg.data.global_batch_size
            if not updated:
                run.skipped_iters += 1
            if got_nan:
                run.nan_iters += 1
            run.flops += flops_per_iter
            lr = run.optimizer.param_groups[0]["lr"]
            scale = float(run.optimizer.get_loss_scale().item())
            tps = tokens / elapsed / world
            tflops = flops_per_iter / elapsed / world / 1e12
            rec = dict(iteration=run.iteration, loss=loss, lr=lr, grad_norm=grad_norm,
                       loss_scale=scale, updated=updated, ms=elapsed * 1000, tokens_per_s=tps,
                       tflops=tflops)
            run.history.append(rec)
            if run.iteration % cfg.log_interval == 0:
                logger.print(iteration_line(
                    run.iteration, cfg.optim.train_iters, run.consumed_train_samples,
                    run.consumed_train_samples * seq_len, elapsed * 1000, lr,
                    cfg.data.global_batch_size, loss, scale, grad_norm, run.skipped_iters,
                    run.nan_iters, tps, tflops))
                logger.scalars(run.iteration, {
                    "lm loss": loss if math.isfinite(loss) else None, "learning-rate": lr,
                    "batch-size": cfg.data.global_batch_size, "loss-scale": scale,
                    "grad-norm": grad_norm if _finite(grad_norm) else None,
                    "iteration-time": elapsed, "tokens-per-second-per-device": tps,
                    "throughput-tflops-per-device": tflops,
                    "skipped-iterations": run.skipped_iters, "nan-iterations": run.nan_iters},
                    samples=run.consumed_train_samples)
            if got_nan and nan_window.add(run.iteration) >= cfg.max_nan_iters:
                raise TrainingStopped(
                    f"{cfg.max_nan_iters} of the last {cfg.nan_window} iterations had NaN/Inf "
                    f"loss or gradients (MP_MAX_NAN_ITERS={cfg.max_nan_iters}); stopping at "
                    f"iteration {run.iteration} (lower LR, check the data)")
            if run.iteration % cfg.eval_interval == 0 and run.iteration < cfg.optim.train_iters:
                _eval_and_log(run, valid_ds, to_sample, seq_len, logger)
            last = run.iteration == cfg.optim.train_iters
            if run.iteration % cfg.checkpoint.save_interval == 0 or last:
                d = checkpointing.save_checkpoint(run, run.iteration)
                last_saved = run.iteration
                logger.print(f"saved checkpoint at iteration {run.iteration} to {d}")
        if valid_ds is not None and cfg.eval_iters and start_iter < cfg.optim.train_iters:
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
