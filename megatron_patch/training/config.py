"""The configuration of one training run, in typed sections; every field is documented here
and nowhere else. ``arguments.build_config`` fills it from the launcher's 25 positional
arguments and the MP_* environment knobs (docs/launcher.md); ``launch_plan`` turns it into a
torchrun layout. Standard library only.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional


class ConfigError(ValueError):
    """A bad launcher argument or env knob; the message is the one line shown to the user."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (NaN/Inf iterations, non-finite weights); one line for the user."""


@dataclass
class ModelConfig:
    generation: str                   # llama | llama2 | llama3 | llama3_1 (from the wrapper)
    size: str                         # MODEL_SIZE: a published size, tiny, or auto (config.json)
    flash_attn: bool = True           # FL: flash attention (TE flash vs fused; SDPA without TE)
    init_method_std: float = 0.008    # weight init for from-scratch runs (Pai's default)


@dataclass
class ParallelConfig:
    tp: int = 1                       # TP: tensor-parallel size
    pp: int = 1                       # PP: pipeline-parallel size
    cp: int = 1                       # CP: context-parallel size (each sequence split over CP
                                      # ranks in 2 x CP chunks; docs/context-parallel.md)
    cp_comm_type: str = "p2p"         # MP_CP_COMM_TYPE: p2p | all_gather | a2a, Transformer
                                      # Engine's CP exchange (without TE: K/V all-gather)
    sequence_parallel: bool = False   # SP: split activations over the TP group
    vp: Optional[int] = None          # MP_VP: virtual pipeline stages per PP rank
    pp0_layers: Optional[int] = None  # MP_PP0_LAYERS: layers on the first pipeline stage

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp


@dataclass
class PrecisionConfig:
    dtype: str = "bf16"               # PR: fp32 | bf16 | fp16 | fp8
    initial_loss_scale: float = 2.0 ** 16  # fp16 dynamic loss scaling starts here


@dataclass
class OptimizerConfig:
    lr: float = 1e-5                  # LR: peak learning rate (after warmup)
    min_lr: float = 1e-6              # MIN_LR: end of the cosine decay
    train_iters: int = 1              # TRAIN_TOKENS_OR_ITERS (pretraining: tokens / (GBS x SEQ_LEN))
    warmup_iters: int = 0             # WARMUP_TOKENS_OR_ITERS, same units
    distributed_optimizer: bool = False  # DO: shard optimizer state over data-parallel ranks
    offload: str = "false"            # OPTIMIZER_OFFLOAD: false | static | auto (DO forced on)
    # MP_OFFLOAD_FRACTION: share of the Adam state stepped on the host with static (None:
    # 1.0); auto plans it at start-up from the device's free memory
    offload_fraction: Optional[float] = None
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8

    @property
    def lr_decay_iters(self) -> int:
        return self.train_iters


@dataclass
class MemoryConfig:
    # AC: sel | full | offload (activations to host memory) | None (false)
    recompute: Optional[str] = None
    # MP_AC_LAYERS: AC=full recomputes in groups of this many layers; AC=offload offloads the
    # first this many layers of every pipeline stage (virtual stage)
    recompute_num_layers: int = 1


@dataclass
class DataConfig:
    micro_batch_size: int = 1         # BATCH_SIZE per data-parallel rank and micro-batch
    global_batch_size: int = 1        # GLOBAL_BATCH_SIZE per optimizer step
    seq_len: int = 2048               # SEQ_LEN: pretraining sequence length
    pad_len: int = 2048               # PAD_LEN: SFT samples are padded/truncated to this
    sft: bool = False                 # SFT: instruction data, loss on answer tokens only
    train_paths: List[str] = field(default_factory=list)  # DATASET_PATH (blend syntax allowed)
    valid_paths: Optional[List[str]] = None  # VALID_DATASET_PATH; None: split the train data
    dataset_type: str = "idxmap"      # MP_DATASET_TYPE (SFT): idxmap | raw (json/jsonl/parquet)
    sft_packing: bool = False         # MP_SFT_PACKING: several SFT samples per PAD_LEN row
    tokenizer: Optional[str] = None   # MP_TOKENIZER (else found next to the checkpoint)
    split: str = "99,1,0"             # MP_DATA_SPLIT: train,valid,test of DATASET_PATH
    train_tokens: Optional[int] = None  # pretraining: the TRAIN_TOKENS argument itself

    @property
    def sample_len(self) -> int:
        """Tokens per sample the model sees."""
        return self.pad_len if self.sft else self.seq_len


@dataclass
class CheckpointConfig:
    load: Optional[str] = None        # PRETRAIN_CHECKPOINT_PATH (None: from scratch)
    format: str = "torch"             # MP_CKPT_FORMAT: torch (per-rank files, Megatron-LM's
    #                                   legacy layout) | torch_dist (megatron-core
    #                                   dist_checkpointing: re-shards natively on load)
    save_interval: int = 1000         # SAVE_INTERVAL (iterations)
    output_base: str = "output"       # OUTPUT_BASEPATH
    # MP_RESUME_FROM: a training checkpoint directory (root or iter_N) of another run to
    # resume -- weights, optimizer, scheduler, data position -- whatever TP/PP/VP/DO it was
    # saved with; used only while this run's own checkpoint directory holds none
    resume_from: Optional[str] = None
    # test hook (MP_TEST_KILL_IN_SAVE): SIGKILL every rank in the middle of saving iteration
    # N, after the rank files are written and before the checkpoint is committed
    kill_in_save_iter: Optional[int] = None


@dataclass
class TrainConfig:
    env: str                          # ENV: dsw (this machine) | dlc (PAI-DLC multi-node)
    model: ModelConfig
    parallel: ParallelConfig
    precision: PrecisionConfig
    optim: OptimizerConfig
    memory: MemoryConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    seed: int = 1234                  # MP_SEED
    log_interval: int = 1
    eval_interval: int = 10000        # MP_EVAL_INTERVAL (Pai's default)
    eval_iters: int = 10              # MP_EVAL_ITERS
    max_nan_iters: int = 10           # MP_MAX_NAN_ITERS: stop after this many NaN/Inf
    nan_window: int = 100             # iterations within the last MP_NAN_WINDOW
    run_name: str = ""                # Pai's run name (from the raw arguments)
    timestamp: str = ""
    notes: List[str] = field(default_factory=list)  # shown at start-up (never silent)

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.checkpoint.output_base, "checkpoint", self.run_name)

    @property
    def tensorboard_dir(self) -> str:
        return os.path.join(self.checkpoint.output_base, "tensorboard",
                            f"{self.run_name}_{self.timestamp}")

    @property
    def log_file(self) -> str:
        return os.path.join(self.checkpoint.output_base, "log",
                            f"{self.run_name}_{self.timestamp}.log")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **sections) -> "TrainConfig":
        """A copy with fields changed per section: ``cfg.replace(optim={"lr": 1e-3})``;
        top-level fields are given directly (``eval_iters=1``)."""
        changes = {}
        for name, value in sections.items():
            current = getattr(self, name)
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                changes[name] = dataclasses.replace(current, **value)
            else:
                changes[name] = value
        return dataclasses.replace(self, **changes)
