"""The launcher's 25 positional arguments and MP_* env knobs -> a validated TrainConfig.

Argument order and names follow Pai-Megatron-Patch's run_mcore_llama.sh (docs/launcher.md).
Every argument is parsed and checked here and nowhere else; a bad one raises ConfigError
with one line naming it and the allowed values. Standard library only: the launcher runs
this before anything heavy starts (``launch_plan``), and the trainer runs it again.
"""
from __future__ import annotations

import glob
import os
import re
import time
from typing import List, Optional, Tuple

from megatron_patch.checkpoint.layout import find_checkpoint
from megatron_patch.models.llama.parallel_layout import LayoutError, check_layout, \
    stage_layer_counts
from megatron_patch.models.llama.presets import GENERATIONS, sizes
from megatron_patch.models.llama.resolve import ArchError, resolve_arch

from .config import (CheckpointConfig, ConfigError, DataConfig, MemoryConfig, ModelConfig,
                     OptimizerConfig, ParallelConfig, PrecisionConfig, TrainConfig)

ARG_NAMES = (
    "ENV", "MODEL_SIZE", "BATCH_SIZE", "GLOBAL_BATCH_SIZE", "LR", "MIN_LR", "SEQ_LEN",
    "PAD_LEN", "PR", "TP", "PP", "CP", "SP", "DO", "FL", "SFT", "AC", "OPTIMIZER_OFFLOAD",
    "SAVE_INTERVAL", "DATASET_PATH", "VALID_DATASET_PATH", "PRETRAIN_CHECKPOINT_PATH",
    "TRAIN_TOKENS_OR_ITERS", "WARMUP_TOKENS_OR_ITERS", "OUTPUT_BASEPATH",
)
PRECISIONS = ("fp16", "bf16", "fp8", "fp32")
# generation -> name used in the run name (like Pai's "llama3-1")
_RUN_TAG = {"llama": "llama", "llama2": "llama2", "llama3": "llama3", "llama3_1": "llama3-1"}

USAGE = "usage: sh run_mcore_<generation>.sh " + " ".join(ARG_NAMES)


def published_sizes(generation: str) -> Tuple[str, ...]:
    return tuple(s for s in sizes(generation) if s != "tiny")


def _err(name: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"{name}={value!r} is not valid: {allowed}")


# ---- small parsers -----------------------------------------------------------------------
def _choice(name, value, choices):
    if value not in choices:
        raise _err(name, value, "allowed values are " + "|".join(choices))
    return value


def _bool(name, value):
    return _choice(name, value, ("true", "false")) == "true"


def _int(name, value, minimum=1):
    if not re.fullmatch(r"[0-9]+", str(value)):
        raise _err(name, value, f"must be an integer >= {minimum}")
    n = int(value)
    if n < minimum:
        raise _err(name, value, f"must be an integer >= {minimum}")
    return n


def _float(name, value, positive=True):
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise _err(name, value, "must be a number such as 1e-5") from None
    if x != x or x in (float("inf"), float("-inf")) or (x <= 0 if positive else x < 0):
        raise _err(name, value, "must be a " + ("positive" if positive else "non-negative")
                   + " finite number such as 1e-5")
    return x


def env_fraction(env, name):
    """A number in [0, 1] from the environment, or None when unset."""
    v = env.get(name, "")
    if v == "":
        return None
    x = _float(name, v, positive=False)
    if x > 1:
        raise _err(name, v, "must be a fraction between 0 and 1")
    return x


def env_int(env, name, default, minimum=1):
    v = env.get(name, "")
    return default if v == "" else _int(name, v, minimum)


# ---- data paths --------------------------------------------------------------------------
def _split_paths(name: str, value: str) -> List[str]:
    """'p' | 'p1 p2' | 'w1 p1 w2 p2' (Megatron's --data-path blend syntax). A value that
    names an existing dataset as a whole is one path, spaces and all."""
    if value.strip() and (os.path.exists(value) or os.path.isfile(value + ".bin")
                          or os.path.isfile(value + "_sft_meta.json")):
        return [value]
    parts = value.split()
    if not parts:
        raise _err(name, value, "give a dataset path")
    return parts


def parse_blend(parts: List[str]) -> Tuple[List[str], Optional[List[float]]]:
    """(paths, weights or None) from Megatron's blend syntax."""
    def num(s):
        try:
            float(s)
            return True
        except ValueError:
            return False
    if len(parts) > 1 and len(parts) % 2 == 0 and all(num(p) for p in parts[0::2]):
        return parts[1::2], [float(w) for w in parts[0::2]]
    return parts, None


def _check_prefix(name: str, prefix: str) -> None:
    missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        hint = ""
        if os.path.isfile(prefix) and prefix.endswith((".bin", ".idx")):
            hint = f" (give the prefix without {prefix[-4:]})"
        raise ConfigError(f"{name}={prefix!r} is not valid: {prefix}.bin and {prefix}.idx must "
                          f"exist (an indexed dataset prefix, e.g. <dir>/corpus_text_document)"
                          + hint)


def _check_data(name: str, parts: List[str], kind: str) -> None:
    """kind: pretrain (<prefix>.bin/.idx), idxmap (SFT idxmap prefix), raw (json/jsonl/
    parquet file, directory or glob)."""
    paths, weights = parse_blend(parts)
    if weights is not None and any(w < 0 for w in weights):
        raise _err(name, " ".join(parts), "blend weights must be >= 0")
    if kind != "pretrain" and len(paths) > 1:
        raise _err(name, " ".join(parts), "SFT reads one dataset (blends are for pretraining)")
    for p in paths:
        if kind == "raw":
            if not (os.path.exists(p) or glob.glob(p)):
                raise ConfigError(f"{name}={p!r} is not valid: with MP_DATASET_TYPE=raw it must "
                                  "be an existing json/jsonl/parquet file, directory or glob")
        elif kind == "idxmap":
            if not os.path.isfile(f"{p}_sft_meta.json"):
                raise ConfigError(f"{name}={p!r} is not valid: {p}_sft_meta.json must exist (an "
                                  "SFT idxmap prefix from build_idxmap_sft_dataset.py; for "
                                  "json files set MP_DATASET_TYPE=raw)")
        else:
            _check_prefix(name, p)


def _check_output_dir(name: str, path: str) -> None:
    """A directory we can create: not an existing file, nor under one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise _err(name, path, "it is an existing file; give a directory (existing or new)")
    up = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise _err(name, path, f"{up} is a file, not a directory; choose another path")


def check_checkpoint(name: str, path: str, what: str) -> None:
    """A Megatron checkpoint directory with a complete, readable checkpoint in it."""
    if not os.path.isdir(path):
        raise _err(name, path, what)
    try:
        find_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise _err(name, path, str(e).replace(f"{path}: ", "", 1)) from None


def _sizes_line(generation: str) -> str:
    return "|".join(published_sizes(generation) + ("tiny", "auto"))


# ---- the 25 arguments ------------------------------------------------------------------------
def build_config(args: List[str], generation: str, env: Optional[dict] = None,
                 timestamp: Optional[str] = None, check_paths: bool = True) -> TrainConfig:
    """Parse and validate the 25 launcher arguments (strings) and the MP_* env knobs.

    Raises ConfigError with a one-line message naming the argument and the allowed values.
    """
    env = os.environ if env is None else env
    if generation not in GENERATIONS:
        raise ConfigError(f"generation {generation!r} is not valid: allowed values are "
                          + "|".join(GENERATIONS))
    if len(args) != len(ARG_NAMES):
        raise ConfigError(f"expected {len(ARG_NAMES)} arguments, got {len(args)}; {USAGE}")
    a = dict(zip(ARG_NAMES, [str(x) for x in args]))
    notes = []

    env_name = _choice("ENV", a["ENV"], ("dsw", "dlc"))
    size = a["MODEL_SIZE"]
    if size.upper() in published_sizes(generation):
        size = size.upper()
    elif size not in ("tiny", "auto"):
        raise _err("MODEL_SIZE", size, f"allowed values for {generation} are "
                   + _sizes_line(generation))
    mbs = _int("BATCH_SIZE", a["BATCH_SIZE"])
    gbs = _int("GLOBAL_BATCH_SIZE", a["GLOBAL_BATCH_SIZE"])
    if gbs % mbs:
        raise _err("GLOBAL_BATCH_SIZE", gbs, f"must be a multiple of BATCH_SIZE={mbs} x data-"
                   "parallel size")
    lr = _float("LR", a["LR"])
    min_lr = _float("MIN_LR", a["MIN_LR"], positive=False)
    if min_lr > lr:
        raise _err("MIN_LR", a["MIN_LR"], f"must be <= LR={a['LR']}")
    seq_len = _int("SEQ_LEN", a["SEQ_LEN"], 2)
    pad_len = _int("PAD_LEN", a["PAD_LEN"], 2)
    pr = _choice("PR", a["PR"], PRECISIONS)
    tp = _int("TP", a["TP"])
    pp = _int("PP", a["PP"])
    cp = _int("CP", a["CP"])
    sp = _bool("SP", a["SP"])
    do = _bool("DO", a["DO"])
    fl = _bool("FL", a["FL"])
    sft = _bool("SFT", a["SFT"])
    ac = _choice("AC", a["AC"], ("sel", "full", "offload", "false"))
    offload = _choice("OPTIMIZER_OFFLOAD", a["OPTIMIZER_OFFLOAD"], ("false", "static", "auto"))
    save_interval = _int("SAVE_INTERVAL", a["SAVE_INTERVAL"])
    train_n = _int("TRAIN_TOKENS_OR_ITERS", a["TRAIN_TOKENS_OR_ITERS"])
    warm_n = _int("WARMUP_TOKENS_OR_ITERS", a["WARMUP_TOKENS_OR_ITERS"], 0)
    out = a["OUTPUT_BASEPATH"]
    if not out.strip():
        raise _err("OUTPUT_BASEPATH", out, "give an output directory")
    _check_output_dir("OUTPUT_BASEPATH", out)

    # env knobs
    dataset_type = env.get("MP_DATASET_TYPE", "") or "idxmap"
    _choice("MP_DATASET_TYPE", dataset_type, ("idxmap", "raw"))
    ac_layers = env_int(env, "MP_AC_LAYERS", 1)
    vp = env_int(env, "MP_VP", None)
    pp0 = env_int(env, "MP_PP0_LAYERS", None)
    packing = _bool("MP_SFT_PACKING", env.get("MP_SFT_PACKING", "") or "false")
    eval_interval = env_int(env, "MP_EVAL_INTERVAL", 10000)
    eval_iters = env_int(env, "MP_EVAL_ITERS", 10, 0)
    seed = env_int(env, "MP_SEED", 1234, 0)
    max_nan = env_int(env, "MP_MAX_NAN_ITERS", 10)
    nan_window = env_int(env, "MP_NAN_WINDOW", 100)
    if max_nan > nan_window:
        raise _err("MP_MAX_NAN_ITERS", max_nan, f"must be <= MP_NAN_WINDOW={nan_window}")
    split = env.get("MP_DATA_SPLIT", "") or "99,1,0"
    if not re.fullmatch(r"\d+(\.\d+)?(,\d+(\.\d+)?){0,2}", split):
        raise _err("MP_DATA_SPLIT", split, "train,valid,test weights such as 99,1,0")
    tokenizer = env.get("MP_TOKENIZER") or None
    kill_save = env_int(env, "MP_TEST_KILL_IN_SAVE", None)
    resume_from = env.get("MP_RESUME_FROM") or None
    offload_fraction = env_fraction(env, "MP_OFFLOAD_FRACTION")
    ckpt_format = _choice("MP_CKPT_FORMAT", env.get("MP_CKPT_FORMAT", "") or "torch",
                          ("torch", "torch_dist"))

    # features that are refused rather than ignored
    if pr == "fp8" and not (_importable("transformer_engine") or _importable("torchao")):
        # the trainer's backend checks the rest (GPU generation; TE vs torchao; never bf16)
        raise ConfigError("PR='fp8' needs Transformer Engine or torchao and neither is "
                          "installed (pip install 'torchao==0.18.*'); use bf16")
    cp_comm = env.get("MP_CP_COMM_TYPE", "") or "p2p"
    _choice("MP_CP_COMM_TYPE", cp_comm, ("p2p", "all_gather", "a2a"))
    if cp > 1 and sft and packing:
        raise ConfigError(f"MP_SFT_PACKING='true' is not supported with CP={cp}: packed "
                          "samples are not split over context-parallel ranks; "
                          "use MP_SFT_PACKING=false or CP=1")
    if cp > 1 and env.get("MP_CP_COMM_TYPE") and not _importable("transformer_engine"):
        notes.append(f"MP_CP_COMM_TYPE={cp_comm} applies to Transformer Engine's attention "
                     "(not installed): K/V are all-gathered over the CP group")
    elif cp == 1 and env.get("MP_CP_COMM_TYPE"):
        notes.append("MP_CP_COMM_TYPE applies to CP > 1 only")
    if offload != "false" and not do:
        # megatron-core's optimizer offload sits on the distributed optimizer (Pai's launcher
        # switches it on the same way)
        notes.append(f"OPTIMIZER_OFFLOAD={offload} needs the distributed optimizer: DO=true")
        do = True
        a["DO"] = "true"
    if offload != "false" and ckpt_format == "torch_dist":
        # HybridDeviceOptimizer keeps Adam's state in sub-optimizers that megatron-core's
        # sharded optimizer state does not describe; the per-rank files save and reshard it
        raise ConfigError(f"MP_CKPT_FORMAT=torch_dist with OPTIMIZER_OFFLOAD={offload} is not "
                          "supported: use MP_CKPT_FORMAT=torch (the default) for offloaded runs")
    if offload_fraction is not None and offload != "static":
        notes.append(f"MP_OFFLOAD_FRACTION={offload_fraction:g} only applies to "
                     f"OPTIMIZER_OFFLOAD=static; OPTIMIZER_OFFLOAD={offload}")
        offload_fraction = None
    if sp and tp == 1:
        notes.append("SP=true has no effect with TP=1 (sequence parallelism splits "
                     "activations over the TP group); running without it")
        sp = False
    if vp == 1:
        vp = None
    if ac not in ("full", "offload") and env.get("MP_AC_LAYERS"):
        notes.append(f"MP_AC_LAYERS={ac_layers} only applies to AC=full|offload; AC={ac}")
    if fl:
        notes.append("FL=true: attention runs through torch scaled_dot_product_attention "
                     "(flash/cuDNN kernels on CUDA; Transformer Engine flash attention when TE "
                     "is installed)")
    else:
        notes.append("FL=false: without Transformer Engine the SDPA core attention is still "
                     "used (megatron's local attention needs apex); with TE, fused attention")
    if not sft:
        notes.append(f"PAD_LEN={pad_len} is used by SFT only (pretraining uses SEQ_LEN)")
        if packing:
            notes.append("MP_SFT_PACKING applies to SFT only")

    # iterations
    if sft:
        train_iters, warmup_iters, train_tokens = train_n, warm_n, None
        if pad_len > seq_len:
            raise _err("PAD_LEN", pad_len, f"must be <= SEQ_LEN={seq_len} for SFT")
    else:
        per_iter = gbs * seq_len
        train_iters, warmup_iters, train_tokens = train_n // per_iter, warm_n // per_iter, train_n
        if train_iters < 1:
            raise _err("TRAIN_TOKENS_OR_ITERS", train_n, f"pretraining counts tokens: at least "
                       f"GLOBAL_BATCH_SIZE x SEQ_LEN = {per_iter} for one iteration")
    if warmup_iters >= train_iters:
        raise _err("WARMUP_TOKENS_OR_ITERS", warm_n, "warmup must be shorter than training ("
                   + (f"{train_iters} iterations)" if sft else
                      f"{train_iters} iterations; warmup tokens / (GLOBAL_BATCH_SIZE x "
                      f"SEQ_LEN) = {warmup_iters})"))

    # data
    data = _split_paths("DATASET_PATH", a["DATASET_PATH"])
    valid_raw = a["VALID_DATASET_PATH"]
    valid: Optional[List[str]]
    if valid_raw.strip().lower() in ("none", ""):
        valid = None
    else:
        valid = _split_paths("VALID_DATASET_PATH", valid_raw)
        if not sft and valid == data:
            valid = None  # Pai passes the same path: split it (MP_DATA_SPLIT)
    kind = dataset_type if sft else "pretrain"
    if check_paths:
        _check_data("DATASET_PATH", data, kind)
        if valid is not None:
            _check_data("VALID_DATASET_PATH", valid, kind)
    if not sft and env.get("MP_DATASET_TYPE") == "raw":
        notes.append("MP_DATASET_TYPE=raw applies to SFT only; pretraining reads indexed data")

    ckpt = a["PRETRAIN_CHECKPOINT_PATH"]
    ckpt = None if ckpt.strip().lower() in ("none", "") else ckpt
    if check_paths and ckpt is not None:
        check_checkpoint("PRETRAIN_CHECKPOINT_PATH", ckpt, "must be none or a Megatron "
                         "checkpoint directory (latest_checkpointed_iteration.txt with "
                         "release/ or iter_N/)")
    if check_paths and resume_from is not None:
        check_checkpoint("MP_RESUME_FROM", resume_from, "must be a training checkpoint "
                         "directory (latest_checkpointed_iteration.txt with iter_N/, or an "
                         "iter_N/ directory)")
    if size == "auto" and ckpt is None:
        raise _err("MODEL_SIZE", "auto", "auto reads config.json next to "
                   "PRETRAIN_CHECKPOINT_PATH, which is none; give a size ("
                   + _sizes_line(generation).replace("|auto", "") + ")")

    cfg = TrainConfig(
        env=env_name,
        model=ModelConfig(generation=generation, size=size, flash_attn=fl),
        parallel=ParallelConfig(tp=tp, pp=pp, cp=cp, cp_comm_type=cp_comm,
                                sequence_parallel=sp, vp=vp, pp0_layers=pp0),
        precision=PrecisionConfig(dtype=pr),
        optim=OptimizerConfig(lr=lr, min_lr=min_lr, train_iters=train_iters,
                              warmup_iters=warmup_iters, distributed_optimizer=do,
                              offload=offload, offload_fraction=offload_fraction),
        memory=MemoryConfig(recompute=None if ac == "false" else ac,
                            recompute_num_layers=ac_layers),
        data=DataConfig(micro_batch_size=mbs, global_batch_size=gbs, seq_len=seq_len,
                        pad_len=pad_len, sft=sft, train_paths=data, valid_paths=valid,
                        dataset_type=dataset_type, sft_packing=packing, tokenizer=tokenizer,
                        split=split, train_tokens=train_tokens),
        checkpoint=CheckpointConfig(load=ckpt, save_interval=save_interval, output_base=out,
                                    kill_in_save_iter=kill_save, resume_from=resume_from,
                                    format=ckpt_format),
        seed=seed, eval_interval=eval_interval, eval_iters=eval_iters, notes=notes,
        max_nan_iters=max_nan, nan_window=nan_window,
        timestamp=timestamp or time.strftime("%Y.%m.%d-%H.%M.%S"),
    )
    cfg.run_name = run_name(cfg, a)
    if check_paths:
        arch = model_arch(cfg)
        check_model_shape(cfg, arch)
        context = arch.max_position_embeddings
        if cfg.data.sample_len > context:
            notes.append(f"{'PAD_LEN' if sft else 'SEQ_LEN'}={cfg.data.sample_len} exceeds the "
                         f"model's {context}-token context (max_position_embeddings): "
                         "positions beyond it were never trained and rope is not rescaled "
                         "for them (set rope_scaling in config.json to extend the context)")
    return cfg


def run_name(cfg: TrainConfig, a: dict) -> str:
    """Pai's naming: <pretrain|finetune>-mcore-<gen>-<size>-lr-..-ti-<iters>-wi-<iters>."""
    kind = "finetune" if cfg.data.sft else "pretrain"
    p = cfg.parallel
    return (f"{kind}-mcore-{_RUN_TAG[cfg.model.generation]}-{a['MODEL_SIZE']}-lr-{a['LR']}"
            f"-minlr-{a['MIN_LR']}-bs-{cfg.data.micro_batch_size}-gbs-"
            f"{cfg.data.global_batch_size}-seqlen-{cfg.data.seq_len}-pr-{cfg.precision.dtype}"
            f"-tp-{p.tp}-pp-{p.pp}-cp-{p.cp}-ac-{a['AC']}-do-{a['DO']}-sp-{a['SP']}"
            f"-ti-{cfg.optim.train_iters}-wi-{cfg.optim.warmup_iters}")


def _importable(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---- the model: which one, and does the layout hold it --------------------------------------
def model_arch(cfg: TrainConfig):
    """The LlamaArch of the run: the preset, or config.json next to the checkpoint (auto);
    a preset is checked against that config.json when there is one."""
    try:
        return resolve_arch(cfg.model.size, generation=cfg.model.generation,
                            checkpoint=cfg.checkpoint.load)
    except ArchError as e:
        raise ConfigError(str(e)) from None


def check_model_shape(cfg: TrainConfig, arch=None, world_size: Optional[int] = None):
    """The layout (TP/PP/CP/VP/MP_PP0_LAYERS, SEQ_LEN) and MP_AC_LAYERS against the model
    (and the process count when given); returns the data-parallel size (or None)."""
    arch = arch or model_arch(cfg)
    p = cfg.parallel
    what = f"{cfg.model.size} {cfg.model.generation}"
    try:
        dp = check_layout(arch, p.tp, p.pp, p.cp, p.vp, p.pp0_layers, world_size,
                          seq_len=cfg.data.sample_len, sequence_parallel=p.sequence_parallel,
                          what=what, seq_name="PAD_LEN" if cfg.data.sft else "SEQ_LEN")
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    if cfg.memory.recompute in ("full", "offload"):
        per_stage = min(stage_layer_counts(arch.num_layers, p.pp, p.vp, p.pp0_layers))
        if cfg.memory.recompute_num_layers > per_stage:
            raise _err("MP_AC_LAYERS", cfg.memory.recompute_num_layers,
                       f"must be <= the {per_stage} layers per pipeline stage")
    return dp
