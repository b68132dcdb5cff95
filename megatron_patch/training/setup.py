"""Set up one training job: model-parallel groups, the Llama model chunks in megatron-core
DDP, the megatron-core optimizer and LR scheduler, and the weights (this run's latest
checkpoint with its optimizer/scheduler/RNG state and counters, or the pretrained one)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from megatron_patch.training.config import ConfigError, TrainConfig, check_model_shape


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
