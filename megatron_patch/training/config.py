"""The training configuration: the launcher's 25 positional arguments + MP_* env knobs.

This module imports only the standard library, so the launcher can validate all 25
arguments in a few milliseconds before anything heavy starts::

    python megatron_patch/training/config.py plan <generation> <25 arguments>

prints shell assignments (the torchrun plan) or one line ``error: ...`` on stderr and exits 2.
The training entry (examples/llama/pretrain_llama.py) builds the same ``TrainConfig`` with
``build_config`` — every argument is parsed and checked here and nowhere else.

Argument order and names follow Pai-Megatron-Patch's run_mcore_llama.sh (DESIGN.md §6).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

ARG_NAMES = (
    "ENV", "MODEL_SIZE", "BATCH_SIZE", "GLOBAL_BATCH_SIZE", "LR", "MIN_LR", "SEQ_LEN",
    "PAD_LEN", "PR", "TP", "PP", "CP", "SP", "DO", "FL", "SFT", "AC", "OPTIMIZER_OFFLOAD",
    "SAVE_INTERVAL", "DATASET_PATH", "VALID_DATASET_PATH", "PRETRAIN_CHECKPOINT_PATH",
    "TRAIN_TOKENS_OR_ITERS", "WARMUP_TOKENS_OR_ITERS", "OUTPUT_BASEPATH",
)
GENERATIONS = ("llama", "llama2", "llama3", "llama3_1")
# The published sizes per generation (the presets in megatron_patch/models/llama/presets.py;
# tests/test_launcher_args.py checks the two agree).
PUBLISHED_SIZES = {
    "llama": ("7B", "13B", "33B", "65B"),
    "llama2": ("7B", "13B", "70B"),
    "llama3": ("8B", "70B"),
    "llama3_1": ("8B", "70B", "405B"),
}
# generation -> name used in the run name (like Pai's "llama3-1")
_RUN_TAG = {"llama": "llama", "llama2": "llama2", "llama3": "llama3", "llama3_1": "llama3-1"}

USAGE = ("usage: sh run_mcore_<generation>.sh " + " ".join(ARG_NAMES))


class ConfigError(ValueError):
    """A bad launcher argument or env knob; the message is the one line shown to the user."""


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


def _env_int(env, name, default, minimum=1):
    v = env.get(name, "")
    return default if v == "" else _int(name, v, minimum)


# ---- the config --------------------------------------------------------------------------
@dataclass
class TrainConfig:
    generation: str
    env: str                              # dsw | dlc
    model_size: str                       # published size, tiny, auto
    micro_batch_size: int
    global_batch_size: int
    lr: float
    min_lr: float
    seq_len: int
    pad_len: int
    precision: str                        # fp32 | bf16 | fp16 | fp8
    tp: int
    pp: int
    cp: int
    sequence_parallel: bool
    distributed_optimizer: bool
    flash_attn: bool
    sft: bool
    recompute: Optional[str]              # sel | full | None
    optimizer_offload: str                # false (static/auto refused)
    save_interval: int
    data_path: List[str]                  # prefixes/files, optionally "weight prefix" pairs
    valid_data_path: Optional[List[str]]  # None: split DATASET_PATH (pretraining)
    pretrain_checkpoint: Optional[str]    # None: from scratch
    train_iters: int
    warmup_iters: int
    output_base: str
    # env knobs
    dataset_type: str = "idxmap"          # MP_DATASET_TYPE (SFT): idxmap | raw
    recompute_num_layers: int = 1         # MP_AC_LAYERS
    vp: Optional[int] = None              # MP_VP: virtual pipeline stages per PP rank
    pp0_layers: Optional[int] = None      # MP_PP0_LAYERS: layers on the first PP stage
    sft_packing: bool = False             # MP_SFT_PACKING
    tokenizer: Optional[str] = None       # MP_TOKENIZER (else next to the checkpoint)
    eval_interval: int = 10000            # MP_EVAL_INTERVAL (Pai's default)
    eval_iters: int = 10                  # MP_EVAL_ITERS
    data_split: str = "99,1,0"            # MP_DATA_SPLIT (pretraining without a valid set)
    seed: int = 1234                      # MP_SEED
    log_interval: int = 1
    # Pai/Megatron-LM defaults
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    init_method_std: float = 0.008
    initial_loss_scale: float = 2.0 ** 16
    # derived
    train_tokens: Optional[int] = None    # pretraining: the TRAIN_TOKENS argument
    run_name: str = ""
    timestamp: str = ""
    notes: List[str] = field(default_factory=list)  # shown at start-up (never silent)
    # test hook: SIGKILL every rank in the middle of saving iteration N (after the rank files
    # are written, before the checkpoint is committed)
    kill_in_save_iter: Optional[int] = None  # MP_TEST_KILL_IN_SAVE

    @property
    def lr_decay_iters(self) -> int:
        return self.train_iters

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.output_base, "checkpoint", self.run_name)

    @property
    def tensorboard_dir(self) -> str:
        return os.path.join(self.output_base, "tensorboard", f"{self.run_name}_{self.timestamp}")

    @property
    def log_file(self) -> str:
        return os.path.join(self.output_base, "log", f"{self.run_name}_{self.timestamp}.log")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _split_paths(name: str, value: str) -> List[str]:
    """'p' | 'p1 p2' | 'w1 p1 w2 p2' (Megatron's --data-path blend syntax)."""
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
            import glob
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


def _sizes_line(generation: str) -> str:
    return "|".join(PUBLISHED_SIZES[generation] + ("tiny", "auto"))


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
    sizes = PUBLISHED_SIZES[generation]
    if size.upper() in sizes:
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
    pr = _choice("PR", a["PR"], ("fp16", "bf16", "fp8", "fp32"))
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

    # env knobs
    dataset_type = env.get("MP_DATASET_TYPE", "") or "idxmap"
    _choice("MP_DATASET_TYPE", dataset_type, ("idxmap", "raw"))
    ac_layers = _env_int(env, "MP_AC_LAYERS", 1)
    vp = _env_int(env, "MP_VP", None)
    pp0 = _env_int(env, "MP_PP0_LAYERS", None)
    packing = env.get("MP_SFT_PACKING", "") or "false"
    packing = _bool("MP_SFT_PACKING", packing)
    eval_interval = _env_int(env, "MP_EVAL_INTERVAL", 10000)
    eval_iters = _env_int(env, "MP_EVAL_ITERS", 10, 0)
    seed = _env_int(env, "MP_SEED", 1234, 0)
    split = env.get("MP_DATA_SPLIT", "") or "99,1,0"
    if not re.fullmatch(r"\d+(\.\d+)?(,\d+(\.\d+)?){0,2}", split):
        raise _err("MP_DATA_SPLIT", split, "train,valid,test weights such as 99,1,0")
    tokenizer = env.get("MP_TOKENIZER") or None
    kill_save = _env_int(env, "MP_TEST_KILL_IN_SAVE", None)

    # features that are refused rather than ignored
    if pr == "fp8" and not _te_importable():
        raise ConfigError("PR='fp8' is not supported on this backend yet: fp8 needs "
                          "Transformer Engine on CUDA (not installed here); use bf16")
    if cp > 1:
        raise ConfigError(f"CP={cp} is not supported on this backend yet: context parallelism "
                          "needs Transformer Engine attention; use CP=1")
    if ac == "offload":
        raise ConfigError("AC='offload' is not supported on this backend yet (activation "
                          "offloading needs Transformer Engine); allowed: sel|full|false")
    if offload != "false":
        raise ConfigError(f"OPTIMIZER_OFFLOAD={offload!r} is not supported on this backend yet "
                          "(needs Transformer Engine's precision-aware optimizer); use false")
    if sp and tp == 1:
        notes.append("SP=true has no effect with TP=1 (sequence parallelism splits "
                      "activations over the TP group); running without it")
        sp = False
    if vp is not None and pp == 1:
        raise _err("MP_VP", vp, "virtual pipeline stages need PP > 1")
    if vp == 1:
        vp = None
    if pp0 is not None and pp == 1:
        raise _err("MP_PP0_LAYERS", pp0, "an uneven first pipeline stage needs PP > 1")
    if pp0 is not None and vp is not None:
        raise _err("MP_PP0_LAYERS", pp0, "cannot be combined with MP_VP")
    if ac != "full" and env.get("MP_AC_LAYERS"):
        notes.append(f"MP_AC_LAYERS={ac_layers} only applies to AC=full; AC={ac}")
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
    if sp:
        name, n = ("PAD_LEN", pad_len) if sft else ("SEQ_LEN", seq_len)
        if n % tp:
            raise _err(name, n, f"must be a multiple of TP={tp} with SP=true")
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
    if check_paths and ckpt is not None and not _looks_like_checkpoint(ckpt):
        raise _err("PRETRAIN_CHECKPOINT_PATH", ckpt, "must be none or a Megatron checkpoint "
                   "directory (latest_checkpointed_iteration.txt with release/ or iter_N/)")
    if size == "auto" and ckpt is None:
        raise _err("MODEL_SIZE", "auto", "auto reads config.json next to "
                   "PRETRAIN_CHECKPOINT_PATH, which is none; give a size ("
                   + _sizes_line(generation).replace("|auto", "") + ")")

    cfg = TrainConfig(
        generation=generation, env=env_name, model_size=size, micro_batch_size=mbs,
        global_batch_size=gbs, lr=lr, min_lr=min_lr, seq_len=seq_len, pad_len=pad_len,
        precision=pr, tp=tp, pp=pp, cp=cp, sequence_parallel=sp, distributed_optimizer=do,
        flash_attn=fl, sft=sft, recompute=None if ac == "false" else ac,
        optimizer_offload=offload, save_interval=save_interval, data_path=data,
        valid_data_path=valid, pretrain_checkpoint=ckpt, train_iters=train_iters,
        warmup_iters=warmup_iters, output_base=out, dataset_type=dataset_type,
        recompute_num_layers=ac_layers, vp=vp, pp0_layers=pp0, sft_packing=packing,
        tokenizer=tokenizer, eval_interval=eval_interval, eval_iters=eval_iters,
        data_split=split, seed=seed, train_tokens=train_tokens, notes=notes,
        kill_in_save_iter=kill_save,
        timestamp=timestamp or time.strftime("%Y.%m.%d-%H.%M.%S"),
    )
    cfg.run_name = run_name(cfg, a)
    check_model_shape(cfg)
    return cfg


def run_name(cfg: TrainConfig, a: dict) -> str:
    """Pai's naming: <pretrain|finetune>-mcore-<gen>-<size>-lr-..-ti-<iters>-wi-<iters>."""
    kind = "finetune" if cfg.sft else "pretrain"
    return (f"{kind}-mcore-{_RUN_TAG[cfg.generation]}-{a['MODEL_SIZE']}-lr-{a['LR']}"
            f"-minlr-{a['MIN_LR']}-bs-{cfg.micro_batch_size}-gbs-{cfg.global_batch_size}"
            f"-seqlen-{cfg.seq_len}-pr-{cfg.precision}-tp-{cfg.tp}-pp-{cfg.pp}-cp-{cfg.cp}"
            f"-ac-{a['AC']}-do-{a['DO']}-sp-{a['SP']}-ti-{cfg.train_iters}"
            f"-wi-{cfg.warmup_iters}")


def _looks_like_checkpoint(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return ("latest_checkpointed_iteration.txt" in names or "release" in names
            or any(re.fullmatch(r"iter_\d{7,}", n) for n in names)
            or any(n.startswith("mp_rank_") for n in names))


def _te_importable() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


# ---- model shape checks (stdlib only: presets.py and arch.py import nothing heavy) -------
def _llama_modules():
    """megatron_patch/models/llama/{arch,presets}.py loaded without running the package
    __init__ files (which import torch and megatron-core)."""
    import importlib
    import types
    name = "_mp_llama_shapes"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "models", "llama")]
        sys.modules[name] = pkg
    return importlib.import_module(name + ".presets"), importlib.import_module(name + ".arch")


def config_json_for(checkpoint: str) -> Optional[str]:
    """config.json next to a checkpoint: inside its root, else in the directory above."""
    for d in (checkpoint, os.path.dirname(os.path.normpath(checkpoint))):
        p = os.path.join(d, "config.json")
        if os.path.isfile(p):
            return p
    return None


def shape_of(cfg: TrainConfig):
    """The LlamaArch for cfg (preset, or config.json for auto), or None when auto has no
    config.json (the checkpoint's own args are read later by the training process)."""
    presets, arch_mod = _llama_modules()
    if cfg.model_size == "auto":
        path = config_json_for(cfg.pretrain_checkpoint)
        if path is None:
            return None
        try:
            return arch_mod.LlamaArch.from_hf_config(path, generation=cfg.generation)
        except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
            raise _err("MODEL_SIZE", "auto", f"cannot read {path}: {exc}") from None
    return presets.get_preset(cfg.generation, cfg.model_size)


def check_model_shape(cfg: TrainConfig, arch=None) -> None:
    """TP/PP/VP/MP_PP0_LAYERS/MP_AC_LAYERS against the model's heads and layers."""
    if arch is None:
        try:
            arch = shape_of(cfg)
        except ImportError:  # running outside the source tree: the trainer checks later
            return
    if arch is None:
        return
    heads, kv, layers = arch.num_attention_heads, arch.num_key_value_heads, arch.num_layers
    for n, what in ((kv, "key/value heads"), (heads, "attention heads"),
                    (arch.ffn_hidden_size, "FFN size")):
        if n % cfg.tp:
            raise _err("TP", cfg.tp, f"must divide the model's {n} {what} "
                       f"({cfg.model_size} {cfg.generation})")
    if cfg.pp > layers:
        raise _err("PP", cfg.pp, f"must not exceed the model's {layers} layers")
    if cfg.pp0_layers is not None:
        rest = layers - cfg.pp0_layers
        if cfg.pp0_layers >= layers or rest % (cfg.pp - 1):
            raise _err("MP_PP0_LAYERS", cfg.pp0_layers, f"the other {rest} of {layers} layers "
                       f"must split evenly over PP-1={cfg.pp - 1} stages")
    elif layers % (cfg.pp * (cfg.vp or 1)):
        if cfg.vp:
            raise _err("MP_VP", cfg.vp, f"PP={cfg.pp} x MP_VP={cfg.vp} must divide the "
                       f"model's {layers} layers")
        raise _err("PP", cfg.pp, f"must divide the model's {layers} layers (or set "
                   "MP_PP0_LAYERS for an uneven first stage)")
    if cfg.recompute == "full":
        per_stage = layers // (cfg.pp * (cfg.vp or 1))
        if cfg.pp0_layers is None and cfg.recompute_num_layers > per_stage:
            raise _err("MP_AC_LAYERS", cfg.recompute_num_layers,
                       f"must be <= the {per_stage} layers per pipeline stage")


# ---- world size / devices (the launcher's plan) -------------------------------------------
def local_device_count(env) -> int:
    """Processes per node for ENV=dsw/dlc: MP_NPROC, else the visible GPUs/NPUs, else 1."""
    if env.get("MP_NPROC"):
        return _int("MP_NPROC", env["MP_NPROC"])
    if (env.get("MEGATRON_PATCH_BACKEND") or "auto").lower() == "cpu":
        return 1
    for var in ("CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES"):
        v = env.get(var)
        if v is not None and v.strip() not in ("", "-1"):
            return len([x for x in v.split(",") if x.strip()])
    for cmd in (["nvidia-smi", "-L"], ["npu-smi", "info", "-l"]):
        if shutil.which(cmd[0]):
            try:
                outp = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            n = len(re.findall(r"^GPU \d+", outp, re.M)) if cmd[0] == "nvidia-smi" else \
                len(re.findall(r"NPU ID", outp))
            if n:
                return n
    return 1


def plan(cfg: TrainConfig, env) -> dict:
    """Process layout for torchrun; checks the world size against TP x PP x CP and GBS."""
    nproc = local_device_count(env)
    if cfg.env == "dlc":
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
                   if not env.get(v)]
        if missing:
            raise ConfigError(f"ENV='dlc' needs the PAI-DLC variables {', '.join(missing)} "
                              "(MASTER_ADDR, MASTER_PORT, WORLD_SIZE = nodes, RANK = node rank)")
        nnodes = _int("WORLD_SIZE", env["WORLD_SIZE"])
        node_rank = _int("RANK", env["RANK"], 0)
        master_addr, master_port = env["MASTER_ADDR"], _int("MASTER_PORT", env["MASTER_PORT"])
    else:
        nnodes, node_rank, master_addr = 1, 0, "localhost"
        # a free port (MASTER_PORT of the surrounding environment may belong to another job)
        master_port = _int("MP_MASTER_PORT", env["MP_MASTER_PORT"]) \
            if env.get("MP_MASTER_PORT") else _free_port()
    world = nnodes * nproc
    mp = cfg.model_parallel_size
    if world % mp:
        raise ConfigError(f"TP={cfg.tp} x PP={cfg.pp} x CP={cfg.cp} = {mp} does not divide the "
                          f"{world} processes ({nnodes} node(s) x {nproc}; set MP_NPROC on CPU)")
    dp = world // mp
    if cfg.global_batch_size % (cfg.micro_batch_size * dp):
        raise _err("GLOBAL_BATCH_SIZE", cfg.global_batch_size, f"must be a multiple of "
                   f"BATCH_SIZE={cfg.micro_batch_size} x data-parallel size {dp} "
                   f"(= {world} processes / (TP x PP x CP))")
    return dict(NPROC=nproc, NNODES=nnodes, NODE_RANK=node_rank, MASTER_ADDR=master_addr,
                MASTER_PORT=master_port, DP=dp, RUN_NAME=cfg.run_name,
                TIMESTAMP=cfg.timestamp, CHECKPOINT_DIR=cfg.checkpoint_dir,
                TENSORBOARD_DIR=cfg.tensorboard_dir, LOG_FILE=cfg.log_file,
                TRAIN_ITERS=cfg.train_iters, WARMUP_ITERS=cfg.warmup_iters)


def _free_port() -> int:
    # not megatron_patch.parallel.free_port: this module runs as a stdlib-only script
    # (the launcher validates arguments without importing torch)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shell_quote(v) -> str:
    return "'" + str(v).replace("'", "'\\''") + "'"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.environ.get("MP_LAUNCHER_NAME", "run_mcore_llama.sh")
    if len(argv) < 2 or argv[0] != "plan":
        print(f"{prog}: usage: config.py plan <generation> <25 arguments>", file=sys.stderr)
        return 2
    try:
        cfg = build_config(argv[2:], argv[1])
        p = plan(cfg, os.environ)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    for k, v in p.items():
        print(f"MP_PLAN_{k}={_shell_quote(v)}")
    return 0  # cfg.notes are printed by the trainer, into the log


if __name__ == "__main__":
    sys.exit(main())
