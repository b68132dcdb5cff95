"""Set up one training job: model-parallel groups, the Llama model chunks in megatron-core
DDP, the megatron-core optimizer and LR scheduler, and the weights (this run's latest
checkpoint with its optimizer/scheduler/RNG state and counters, or the pretrained one)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from megatron_patch.training.arguments import check_model_shape, model_arch
from megatron_patch.training.config import ConfigError, TrainConfig
from megatron_patch.training.launch_plan import check_batches


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
    activation_offload: object = None   # AC=offload with torch hooks: their byte counters
    history: list = field(default_factory=list)   # per-iteration metrics (this process)
    evals: list = field(default_factory=list)

    def counters(self) -> dict:
        return {"iteration": self.iteration,
                "consumed_train_samples": self.consumed_train_samples,
                "consumed_valid_samples": self.consumed_valid_samples,
                "skipped_iters": self.skipped_iters, "nan_iters": self.nan_iters,
                "flops": self.flops}


# ---- TrainConfig -> megatron-core configuration objects (pure: no process group) ----------
# setup() builds the run from exactly these, so a test can check that every launcher
# argument reaches the megatron-core field it names without training (tests/test_config_wiring.py)
@dataclass
class MegatronConfigs:
    transformer: object   # megatron.core TransformerConfig
    optimizer: object     # megatron.core.optimizer OptimizerConfig
    ddp: object           # megatron.core.distributed DistributedDataParallelConfig
    scheduler: dict       # OptimizerParamScheduler's keyword arguments (all but the optimizer)


def megatron_configs(cfg: TrainConfig, arch, backend,
                     offload_fraction=None) -> MegatronConfigs:
    """The megatron-core configuration objects setup() builds for cfg on ``backend``.
    OPTIMIZER_OFFLOAD=static's fraction comes from cfg; auto's is planned by setup() from
    the device's free memory once the model exists (pass it as ``offload_fraction``)."""
    from megatron_patch.training.model_setup import ddp_config, optimizer_config
    tconfig = transformer_config_for(cfg, arch, backend)
    if offload_fraction is None and cfg.optim.offload == "static":
        offload_fraction = 1.0 if cfg.optim.offload_fraction is None \
            else cfg.optim.offload_fraction
    return MegatronConfigs(tconfig, optimizer_config(tconfig, offload_fraction=offload_fraction,
                                                     **_optimizer_config_kwargs(cfg)),
                           ddp_config(**ddp_kwargs(cfg)), scheduler_kwargs(cfg))


def transformer_config_for(cfg: TrainConfig, arch, backend):
    """The TransformerConfig of a run: the model, layout, precision, recompute and the
    backend's kernel choices (PR=fp8: its fp8 recipe, bf16 parameters)."""
    from megatron_patch.models.llama.config import ParallelSettings, transformer_config
    from megatron_patch.training import offload
    par = cfg.parallel
    precision = cfg.precision.dtype
    # the loss is the mean over every loss token of the global batch (DP x CP), whatever
    # the layout (forward_step.masked_lm_loss)
    overrides = {"init_method_std": cfg.model.init_method_std,
                 "calculate_per_token_loss": True}
    overrides.update(backend.training_overrides(
        cfg.model.flash_attn, precision, cp_comm_type=par.cp_comm_type if par.cp > 1 else None))
    if precision == "fp8":  # the backend set the fp8 recipe; parameters are bf16
        precision = "bf16"
    overrides.update(offload.te_activation_offload(cfg, arch, backend))  # {}: torch hooks
    return transformer_config(
        arch, ParallelSettings(tp=par.tp, pp=par.pp, cp=par.cp,
                               sequence_parallel=par.sequence_parallel, vp=par.vp,
                               pp0_layers=par.pp0_layers),
        precision, recompute=offload.recompute_mode(cfg),
        recompute_num_layers=cfg.memory.recompute_num_layers, **overrides)


def ddp_kwargs(cfg: TrainConfig) -> dict:
    """model_setup.build_model_chunks' / ddp_config's keyword arguments."""
    return dict(use_distributed_optimizer=cfg.optim.distributed_optimizer)


def scheduler_kwargs(cfg: TrainConfig) -> dict:
    """OptimizerParamScheduler's keyword arguments: cosine LR with warmup to MIN_LR,
    counted in samples like Megatron-LM."""
    gbs, o = cfg.data.global_batch_size, cfg.optim
    return dict(init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
                lr_warmup_steps=o.warmup_iters * gbs, lr_decay_steps=o.lr_decay_iters * gbs,
                lr_decay_style="cosine", start_wd=o.weight_decay, end_wd=o.weight_decay,
                wd_incr_steps=o.train_iters * gbs, wd_incr_style="constant")


def _optimizer_config_kwargs(cfg: TrainConfig) -> dict:
    o = cfg.optim
    return dict(lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad,
                use_distributed_optimizer=o.distributed_optimizer, adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                initial_loss_scale=cfg.precision.initial_loss_scale)


def _fp8_path(backend):
    """The backend's fp8 implementation; 'cannot run fp8 here' is a one-line ConfigError."""
    from megatron_patch.transformer.fp8 import Fp8Unavailable
    try:
        return backend.fp8_path()
    except Fp8Unavailable as exc:
        raise ConfigError(str(exc)) from None


def _prepare_fp8(fp8, chunks, log) -> None:
    from megatron_patch.transformer.fp8 import Fp8Unavailable
    try:
        routed = sum(len(fp8.prepare_model(c.module)) for c in chunks)
    except Fp8Unavailable as exc:
        raise ConfigError(str(exc)) from None
    log(f"> {fp8.describe()}" + (f" ({routed} linear layers on this rank)" if routed else ""))


def setup(cfg: TrainConfig, log=print) -> tuple:
    """Model chunks, optimizer, scheduler; weights from this run's latest checkpoint (with
    optimizer, scheduler, RNG and counters) or from PRETRAIN_CHECKPOINT_PATH. Returns a Run."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator, init_num_microbatches_calculator)
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_patch import checkpoint as ckpt_lib
    from megatron_patch import parallel
    from megatron_patch.backends import active_backend
    from megatron_patch.training import checkpointing, offload
    from megatron_patch.training.model_setup import build_model_chunks, build_optimizer

    par = cfg.parallel
    arch = model_arch(cfg)
    dp = check_model_shape(cfg, arch, world_size=dist.get_world_size())
    num_microbatches = check_batches(cfg, dp)
    parallel.initialize_model_parallel(tp=par.tp, pp=par.pp, cp=par.cp, vp=par.vp,
                                       seed=cfg.seed)
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(dist.get_rank(), None, cfg.data.global_batch_size,
                                     cfg.data.micro_batch_size, dp, False)

    backend = active_backend()
    fp8 = _fp8_path(backend) if cfg.precision.dtype == "fp8" else None
    tconfig = transformer_config_for(cfg, arch, backend)
    chunks = build_model_chunks(arch, tconfig, **ddp_kwargs(cfg))
    if fp8 is not None:
        _prepare_fp8(fp8, chunks, log)
    activation_offload = offload.attach_activation_offload(
        cfg, chunks, backend, bool(offload.te_activation_offload(cfg, arch, backend)), log)

    # weights: resume from this run's own latest checkpoint (else MP_RESUME_FROM's), else
    # the pretrained one
    found = checkpointing.find_resume(cfg.checkpoint_dir, cfg.checkpoint.resume_from, warn=log)
    resume = None
    if found is not None and found.format == ckpt_lib.DIST_FORMAT:
        log(f"resuming from {found.path} (iteration {found.iteration}, torch_dist: loaded "
            f"once the optimizer exists, re-sharded to this layout)")
    elif found is not None:
        resume = checkpointing.load_resume_state(
            Run(cfg, arch, chunks, None, None, tconfig), found)
        log(f"resuming from {found.path} (iteration {found.iteration})")
    elif cfg.checkpoint.load:
        got = ckpt_lib.load_model_shards(cfg.checkpoint.load, chunks, arch=arch)
        log(f"loaded pretrained weights from {got.path} (TP={got.tp} PP={got.pp} -> "
            f"TP={par.tp} PP={par.pp})")
    else:
        log("training from scratch (PRETRAIN_CHECKPOINT_PATH=none)")

    # the optimizer copies main params from the (loaded) model params
    fraction = offload.optimizer_offload_fraction(cfg, arch, chunks, backend, dp,
                                                  num_microbatches, log=log)
    optimizer = build_optimizer(chunks, tconfig, offload_fraction=fraction,
                                **_optimizer_config_kwargs(cfg))
    scheduler = OptimizerParamScheduler(optimizer, **scheduler_kwargs(cfg))

    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    no_sync = [c.no_sync for c in chunks]
    tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    run = Run(cfg, arch, chunks, optimizer, scheduler, tconfig,
              activation_offload=activation_offload)
    if found is not None and found.format == ckpt_lib.DIST_FORMAT:
        state = checkpointing.restore_dist_training_state(run, found)
    elif resume is not None:
        state, rank_file = resume
        checkpointing.restore_training_state(run, state, rank_file)
    if found is not None:
        c = state.get("megatron_patch", {})
        run.iteration = int(state["iteration"])
        run.consumed_train_samples = int(c.get("consumed_train_samples",
                                               run.iteration * cfg.data.global_batch_size))
        run.consumed_valid_samples = int(c.get("consumed_valid_samples", 0))
        run.skipped_iters = int(c.get("skipped_iters", 0))
        run.nan_iters = int(c.get("nan_iters", 0))
        run.flops = float(c.get("flops", 0.0))
    return run
