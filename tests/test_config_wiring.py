"""Every launcher argument and MP_* knob reaches the field it names, and nothing else.

Table-driven, without training: for each row the 25 arguments (and env) of a base run are
built with one argument set to a distinctive value, and everything the run would be built
from is compared with the base run's:

- the ``TrainConfig`` (arguments.build_config),
- megatron-core's ``TransformerConfig``, ``OptimizerConfig`` and
  ``DistributedDataParallelConfig`` and the ``OptimizerParamScheduler`` built from
  ``setup.megatron_configs`` (what ``setup.setup`` builds the run from).

A row lists every field that must change and its new value; any other field that changes
fails the row, and so does a listed field that keeps its base value. The base values differ
from every row's value, so two arguments read into each other's fields (DO and FL
swapped, say) move the wrong field and fail both rows. The expected values are written
from the launcher contract (docs/launcher.md) and the published Llama-3.1-8B config, not
read from the code under test. ``test_base_run`` pins the base run's own values.

``test_megatron_objects_built_from_these`` closes the loop for the objects that setup()
passes through model_setup: the DDP config a wrapped chunk holds and the optimizer's config
equal ``megatron_configs``' (one process, tiny model).
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Optional

import pytest
import torch

from megatron_patch.training.arguments import ARG_NAMES, build_config, model_arch
from megatron_patch.training.config import ConfigError
from megatron_patch.training.setup import megatron_configs

GEN = "llama3_1"
# the base run: tiny Llama-3.1, pretraining, 10 iterations of GBS 8 x SEQ 64 tokens, 2 warmup
BASE = dict(
    ENV="dsw", MODEL_SIZE="tiny", BATCH_SIZE="2", GLOBAL_BATCH_SIZE="8", LR="3e-4",
    MIN_LR="3e-5", SEQ_LEN="64", PAD_LEN="32", PR="bf16", TP="1", PP="1", CP="1", SP="false",
    DO="false", FL="true", SFT="false", AC="false", OPTIMIZER_OFFLOAD="false",
    SAVE_INTERVAL="100", DATASET_PATH="/data/train_text_document",
    VALID_DATASET_PATH="/data/valid_text_document", PRETRAIN_CHECKPOINT_PATH="none",
    TRAIN_TOKENS_OR_ITERS=str(10 * 8 * 64), WARMUP_TOKENS_OR_ITERS=str(2 * 8 * 64),
    OUTPUT_BASEPATH="/out/base")
assert tuple(BASE) == ARG_NAMES

SCALED_INIT = ("normal_", 0.0)  # megatron's init: functools.partial(torch.nn.init.normal_, ...)


def normal(std: float) -> tuple:
    return SCALED_INIT + (std,)


# ---- the table ------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    arg: str                 # launcher argument or MP_* knob
    value: str
    train: dict              # TrainConfig path -> value
    transformer: dict = dataclasses.field(default_factory=dict)
    optimizer: dict = dataclasses.field(default_factory=dict)
    ddp: dict = dataclasses.field(default_factory=dict)
    scheduler: dict = dataclasses.field(default_factory=dict)
    context: dict = dataclasses.field(default_factory=dict)  # base changes for this row
    refused: Optional[str] = None  # ConfigError text while this backend refuses the value

    @property
    def id(self):
        ctx = ",".join(f"{k}={v}" for k, v in self.context.items())
        return f"{self.arg}={self.value}" + (f"[{ctx}]" if ctx else "")


# Llama-3.1-8B, from Meta's published config.json (meta-llama/Llama-3.1-8B)
L8B = dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
           ffn_hidden_size=14336, kv_channels=128)
# the tiny Llama-3.1 preset (the base): 4 layers, hidden 128, 4 heads, 2 KV heads, FFN 352
TINY_LAYERS = 4
INIT_STD = 0.008  # TrainConfig.model.init_method_std (Pai's from-scratch default)

ROWS = [
    Row("ENV", "dlc", {"env": "dlc"}),
    Row("MODEL_SIZE", "8B", {"model.size": "8B"},
        transformer=dict(L8B, output_layer_init_method=normal(INIT_STD / math.sqrt(2 * 32)))),
    Row("BATCH_SIZE", "4", {"data.micro_batch_size": 4}),
    # pretraining counts tokens: GBS 16 halves the iterations; the scheduler counts samples
    Row("GLOBAL_BATCH_SIZE", "16", {"data.global_batch_size": 16, "optim.train_iters": 5,
                                    "optim.warmup_iters": 1}),
    Row("LR", "6e-4", {"optim.lr": 6e-4}, optimizer={"lr": 6e-4}, scheduler={"max_lr": 6e-4}),
    Row("MIN_LR", "6e-5", {"optim.min_lr": 6e-5}, optimizer={"min_lr": 6e-5},
        scheduler={"min_lr": 6e-5}),
    Row("SEQ_LEN", "128", {"data.seq_len": 128, "optim.train_iters": 5, "optim.warmup_iters": 1},
        scheduler={"lr_warmup_steps": 8, "lr_decay_steps": 40, "wd_incr_steps": 40}),
    Row("PAD_LEN", "48", {"data.pad_len": 48}),
    Row("PR", "fp32", {"precision.dtype": "fp32"},
        transformer={"params_dtype": torch.float32, "pipeline_dtype": torch.float32,
                     "autocast_dtype": torch.float32, "bf16": False},
        optimizer={"params_dtype": torch.float32, "bf16": False}),
    Row("PR", "fp16", {"precision.dtype": "fp16"},
        transformer={"params_dtype": torch.float16, "pipeline_dtype": torch.float16,
                     "autocast_dtype": torch.float16, "bf16": False, "fp16": True},
        optimizer={"params_dtype": torch.float16, "bf16": False, "fp16": True,
                   "initial_loss_scale": 2.0 ** 16}),
    # megatron-core itself sets the expert TP size to TP when not given (Llama has no experts)
    # fp8: bf16 parameters (the float8 matmuls are routed when the model is built:
    # test_fp8.py); the cpu backend's torchao path asks for no other megatron field
    Row("PR", "fp8", {"precision.dtype": "fp8"},
        refused="PR='fp8' needs Transformer Engine or torchao"),
    Row("TP", "2", {"parallel.tp": 2}, transformer={"tensor_model_parallel_size": 2,
                                                    "expert_tensor_parallel_size": 2}),
    # megatron-core groups micro-batches per virtual stage by PP when not given
    Row("PP", "2", {"parallel.pp": 2}, transformer={"pipeline_model_parallel_size": 2,
                                                    "microbatch_group_size_per_vp_stage": 2}),
    Row("CP", "2", {"parallel.cp": 2}, transformer={"context_parallel_size": 2}),
    Row("SP", "true", {"parallel.sequence_parallel": True},
        transformer={"sequence_parallel": True}, context={"TP": "2"}),
    Row("DO", "true", {"optim.distributed_optimizer": True},
        optimizer={"use_distributed_optimizer": True}, ddp={"use_distributed_optimizer": True}),
    # without Transformer Engine FL picks nothing in megatron (SDPA either way); with TE see
    # test_flash_attention_reaches_te_attention_backend
    Row("FL", "false", {"model.flash_attn": False}),
    # SFT counts iterations, not tokens
    Row("SFT", "true", {"data.sft": True, "optim.train_iters": 5120, "optim.warmup_iters": 1024,
                        "data.train_tokens": None},
        scheduler={"lr_warmup_steps": 1024 * 8, "lr_decay_steps": 5120 * 8,
                   "wd_incr_steps": 5120 * 8}),
    Row("AC", "sel", {"memory.recompute": "sel"},
        transformer={"recompute_granularity": "selective"}),
    Row("AC", "full", {"memory.recompute": "full"},
        transformer={"recompute_granularity": "full", "recompute_method": "uniform",
                     "recompute_num_layers": 1}),
    # offload recomputes nothing; without Transformer Engine torch hooks offload (no field)
    Row("AC", "offload", {"memory.recompute": "offload"}),
    # megatron-core's optimizer CPU offload sits on the distributed optimizer (forced on);
    # bf16: precision-aware (main weights offloaded too, so no param remainders); the cpu
    # backend pins nothing
    Row("OPTIMIZER_OFFLOAD", "static", {"optim.offload": "static",
                                        "optim.distributed_optimizer": True},
        optimizer={"optimizer_cpu_offload": True, "optimizer_offload_fraction": 1.0,
                   "use_distributed_optimizer": True, "use_precision_aware_optimizer": True,
                   "overlap_cpu_optimizer_d2h_h2d": True, "pin_cpu_grads": False,
                   "pin_cpu_params": False, "store_param_remainders": False},
        ddp={"use_distributed_optimizer": True}),
    Row("SAVE_INTERVAL", "7", {"checkpoint.save_interval": 7}),
    Row("DATASET_PATH", "/data/other_text_document",
        {"data.train_paths": ["/data/other_text_document"]}),
    Row("DATASET_PATH", "0.3 /data/a 0.7 /data/b",
        {"data.train_paths": ["0.3", "/data/a", "0.7", "/data/b"]}),
    Row("VALID_DATASET_PATH", "/data/other_valid", {"data.valid_paths": ["/data/other_valid"]}),
    Row("VALID_DATASET_PATH", "none", {"data.valid_paths": None}),
    Row("PRETRAIN_CHECKPOINT_PATH", "/ckpt/pretrained", {"checkpoint.load": "/ckpt/pretrained"}),
    Row("TRAIN_TOKENS_OR_ITERS", str(20 * 8 * 64),
        {"optim.train_iters": 20, "data.train_tokens": 20 * 8 * 64},
        scheduler={"lr_decay_steps": 160, "wd_incr_steps": 160}),
    Row("WARMUP_TOKENS_OR_ITERS", str(4 * 8 * 64), {"optim.warmup_iters": 4},
        scheduler={"lr_warmup_steps": 32}),
    Row("OUTPUT_BASEPATH", "/out/other", {"checkpoint.output_base": "/out/other"}),
    # env knobs
    Row("MP_DATASET_TYPE", "raw", {"data.dataset_type": "raw"}, context={"SFT": "true"}),
    Row("MP_AC_LAYERS", "2", {"memory.recompute_num_layers": 2},
        transformer={"recompute_num_layers": 2}, context={"AC": "full"}),
    Row("MP_VP", "2", {"parallel.vp": 2},
        transformer={"virtual_pipeline_model_parallel_size": 2}, context={"PP": "2"}),
    Row("MP_PP0_LAYERS", "1", {"parallel.pp0_layers": 1},
        transformer={"num_layers_in_first_pipeline_stage": 1}, context={"PP": "2"}),
    Row("MP_SFT_PACKING", "true", {"data.sft_packing": True}, context={"SFT": "true"}),
    Row("MP_TOKENIZER", "/tok", {"data.tokenizer": "/tok"}),
    Row("MP_EVAL_INTERVAL", "50", {"eval_interval": 50}),
    Row("MP_EVAL_ITERS", "3", {"eval_iters": 3}),
    Row("MP_DATA_SPLIT", "90,5,5", {"data.split": "90,5,5"}),
    Row("MP_SEED", "7", {"seed": 7}),
    Row("MP_MAX_NAN_ITERS", "5", {"max_nan_iters": 5}),
    Row("MP_NAN_WINDOW", "50", {"nan_window": 50}),
    Row("MP_RESUME_FROM", "/ckpt/previous", {"checkpoint.resume_from": "/ckpt/previous"}),
    Row("MP_TEST_KILL_IN_SAVE", "3", {"checkpoint.kill_in_save_iter": 3}),
    Row("MP_OFFLOAD_FRACTION", "0.25", {"optim.offload_fraction": 0.25},
        optimizer={"optimizer_offload_fraction": 0.25}, context={"OPTIMIZER_OFFLOAD": "static"}),
    # Transformer Engine's CP exchange: no megatron field changes without TE
    Row("MP_CP_COMM_TYPE", "a2a", {"parallel.cp_comm_type": "a2a"}, context={"CP": "2"}),
    Row("MP_CKPT_FORMAT", "torch_dist", {"checkpoint.format": "torch_dist"}),
]

# the base run's values of every field a row names (TrainConfig and megatron objects)
BASE_TRAIN = {
    "env": "dsw", "model.size": "tiny", "model.flash_attn": True, "data.micro_batch_size": 2,
    "data.global_batch_size": 8, "optim.lr": 3e-4, "optim.min_lr": 3e-5, "data.seq_len": 64,
    "data.pad_len": 32, "precision.dtype": "bf16", "parallel.tp": 1, "parallel.pp": 1,
    "parallel.cp": 1, "parallel.sequence_parallel": False, "optim.distributed_optimizer": False,
    "data.sft": False, "memory.recompute": None, "optim.offload": "false",
    "checkpoint.save_interval": 100, "data.train_paths": ["/data/train_text_document"],
    "data.valid_paths": ["/data/valid_text_document"], "checkpoint.load": None,
    "optim.train_iters": 10, "optim.warmup_iters": 2, "data.train_tokens": 10 * 8 * 64,
    "checkpoint.output_base": "/out/base", "data.dataset_type": "idxmap",
    "memory.recompute_num_layers": 1, "parallel.vp": None, "parallel.pp0_layers": None,
    "data.sft_packing": False, "data.tokenizer": None, "eval_interval": 10000,
    "eval_iters": 10, "data.split": "99,1,0", "seed": 1234, "max_nan_iters": 10,
    "nan_window": 100, "checkpoint.resume_from": None, "checkpoint.kill_in_save_iter": None,
    "optim.offload_fraction": None, "parallel.cp_comm_type": "p2p", "checkpoint.format": "torch",
}
BASE_MEGATRON = {
    "transformer": dict(num_layers=TINY_LAYERS, hidden_size=128, num_attention_heads=4,
                        num_query_groups=2, ffn_hidden_size=352, kv_channels=32,
                        params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, bf16=True,
                        fp16=False, tensor_model_parallel_size=1,
                        pipeline_model_parallel_size=1, context_parallel_size=1,
                        sequence_parallel=False, recompute_granularity=None,
                        virtual_pipeline_model_parallel_size=None,
                        num_layers_in_first_pipeline_stage=None, init_method_std=INIT_STD,
                        init_method=normal(INIT_STD),
                        output_layer_init_method=normal(INIT_STD / math.sqrt(2 * TINY_LAYERS)),
                        hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
                        gated_linear_unit=True, add_bias_linear=False,
                        # the loss is the mean over every loss token of DP x CP
                        calculate_per_token_loss=True),
    "optimizer": dict(optimizer="adam", lr=3e-4, min_lr=3e-5, weight_decay=0.1, clip_grad=1.0,
                      adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, bf16=True, fp16=False,
                      params_dtype=torch.bfloat16, use_distributed_optimizer=False,
                      initial_loss_scale=None),
    "ddp": dict(use_distributed_optimizer=False, grad_reduce_in_fp32=True),
    # cosine from 0 over 2 warmup + 8 decay iterations of 8 samples, to MIN_LR
    "scheduler": dict(init_lr=0.0, max_lr=3e-4, min_lr=3e-5, lr_warmup_steps=16,
                      lr_decay_steps=80, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                      wd_incr_steps=80, wd_incr_style="constant", num_steps=0),
}
# derived text, compared elsewhere (test_launcher_args: run name; notes are messages)
IGNORED_TRAIN = {"run_name", "notes", "timestamp"}


# ---- flattening -----------------------------------------------------------------------------
def _norm(v):
    """Comparable form of a config value (callables by name, partials by their arguments)."""
    if isinstance(v, functools.partial):
        return (v.func.__name__,) + tuple(v.args) + tuple(v.keywords[k] for k in sorted(v.keywords))
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, enum.Enum):
        return f"{type(v).__name__}.{v.name}"
    if callable(v):
        return f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', repr(v))}"
    if isinstance(v, list):
        return tuple(_norm(x) for x in v)
    return v


def _flat(obj, prefix="") -> dict:
    if dataclasses.is_dataclass(obj):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.items())
    else:
        return {prefix: _norm(obj)}
    out = {}
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else k
        if dataclasses.is_dataclass(v):
            out.update(_flat(v, key))
        else:
            out[key] = _norm(v)
    return out


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b  # True must not pass for 1
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _scheduler(kwargs: dict) -> dict:
    """The OptimizerParamScheduler megatron-core builds from these arguments (a one-
    parameter torch optimizer stands in for megatron's: the scheduler only sets its
    param_groups' lr/wd)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = OptimizerParamScheduler(opt, **kwargs)
    return {k: _norm(v) for k, v in vars(sched).items() if k != "optimizer"}


def build(args: dict, env: dict, backend=None) -> dict:
    """{'train': ..., 'transformer': ..., 'optimizer': ..., 'ddp': ..., 'scheduler': ...}
    flattened, as the trainer would build them from these launcher arguments."""
    from megatron_patch.backends import active_backend
    cfg = build_config([args[n] for n in ARG_NAMES], GEN, env=env, timestamp="T",
                       check_paths=False)
    mc = megatron_configs(cfg, model_arch(cfg), backend or active_backend())
    train = {k: v for k, v in _flat(cfg).items() if k not in IGNORED_TRAIN}
    return {"train": train, "transformer": _flat(mc.transformer),
            "optimizer": _flat(mc.optimizer), "ddp": _flat(mc.ddp),
            "scheduler": _scheduler(mc.scheduler)}


def _split_context(context: dict):
    args = {k: v for k, v in context.items() if k in ARG_NAMES}
    env = {k: v for k, v in context.items() if k not in ARG_NAMES}
    return args, env


def _variant(row: Row, with_value: bool):
    ctx_args, ctx_env = _split_context(row.context)
    args, env = dict(BASE, **ctx_args), dict(ctx_env)
    if with_value:
        (args if row.arg in ARG_NAMES else env)[row.arg] = row.value
    return args, env


def diff(base: dict, new: dict) -> dict:
    """{(object, field): (base value, new value)} of every field that differs."""
    out = {}
    for obj in base:
        for k in sorted(set(base[obj]) | set(new[obj])):
            a, b = base[obj].get(k, "<absent>"), new[obj].get(k, "<absent>")
            if not _same(a, b):
                out[(obj, k)] = (a, b)
    return out


def expected(row: Row) -> dict:
    return {**{("train", k): _norm(v) for k, v in row.train.items()},
            **{(obj, k): _norm(v) for obj in ("transformer", "optimizer", "ddp", "scheduler")
               for k, v in getattr(row, obj).items()}}


def check_row(row: Row, backend=None) -> None:
    base = build(*_variant(row, False), backend=backend)
    try:
        new = build(*_variant(row, True), backend=backend)
    except ConfigError as exc:
        if row.refused and str(exc).startswith(row.refused):
            pytest.skip(f"refused on this backend: {exc}")
        raise
    got, want = diff(base, new), expected(row)
    problems = []
    for key, value in want.items():
        if key not in got:
            now = new[key[0]].get(key[1], "<absent>")
            problems.append(f"{key[0]}.{key[1]} should become {value!r}, is {now!r} "
                            f"(unchanged)" if _same(now, base[key[0]].get(key[1])) else
                            f"{key[0]}.{key[1]} should become {value!r}, is {now!r}")
        elif not _same(got[key][1], value):
            problems.append(f"{key[0]}.{key[1]} should become {value!r}, is {got[key][1]!r}")
    for key, (a, b) in got.items():
        if key not in want:
            problems.append(f"{key[0]}.{key[1]} changed too: {a!r} -> {b!r}")
    assert not problems, f"{row.id}:\n  " + "\n  ".join(problems)


# ---- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_argument_changes_exactly_its_fields(row):
    check_row(row)


def test_table_covers_every_argument_and_knob():
    """Every launcher argument has a row, and every row value differs from the base."""
    import inspect
    import re

    from megatron_patch.training import arguments
    src = inspect.getsource(arguments.build_config)
    knobs = set(re.findall(r'"(MP_[A-Z0-9_]+)"', src))
    covered = {r.arg for r in ROWS}
    assert set(ARG_NAMES) - covered == set()
    assert knobs - covered == set(), "MP_* knobs read by build_config without a row"
    for row in ROWS:
        ctx_args, ctx_env = _split_context(row.context)
        before = ctx_args.get(row.arg, BASE.get(row.arg)) if row.arg in ARG_NAMES else \
            ctx_env.get(row.arg)
        assert before != row.value, row.id
        for path, value in row.train.items():
            if not row.context:  # the base value of a named field is never the new value
                assert not _same(_norm(BASE_TRAIN[path]), _norm(value)), (row.id, path)


def test_base_run():
    """The base run's own values: each argument in its field (not only the differences)."""
    got = build(dict(BASE), {})
    for path, value in BASE_TRAIN.items():
        assert _same(got["train"][path], _norm(value)), (path, got["train"][path], value)
    for obj, fields in BASE_MEGATRON.items():
        for name, value in fields.items():
            assert _same(got[obj][name], _norm(value)), (obj, name, got[obj][name], value)


def test_sequence_parallel_without_tp_is_off():
    """SP=true with TP=1 is a note and no change (megatron would refuse SP without TP)."""
    check_row(Row("SP", "true", {}))


def test_flash_attention_reaches_te_attention_backend(monkeypatch):
    """With Transformer Engine (cuda backend; TE mocked as in test_backend_cuda.py) FL picks
    TE's flash attention (true) or cuDNN fused attention (false), Pai's NVTE switch."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer.enums import AttnBackend

    from megatron_patch.backends import cuda
    monkeypatch.setattr(cuda, "te_available", lambda: True)
    monkeypatch.setattr(cuda, "apex_grad_accum_available", lambda: False)
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)
    backend = cuda.CudaBackend.__new__(cuda.CudaBackend)  # kernel choices only, no device
    base = build(dict(BASE), {}, backend=backend)
    assert base["transformer"]["attention_backend"] == _norm(AttnBackend.flash)
    check_row(Row("FL", "false", {"model.flash_attn": False},
                  transformer={"attention_backend": AttnBackend.fused}), backend=backend)


def test_megatron_objects_built_from_these(mp1):
    """The DDP config of a wrapped chunk and the optimizer's config are megatron_configs'
    (setup() passes ddp_kwargs / _optimizer_config_kwargs through model_setup)."""
    from megatron_patch.backends import active_backend
    from megatron_patch.training import setup
    from megatron_patch.training.model_setup import build_model_chunks, build_optimizer
    for do in ("false", "true"):
        args = dict(BASE, DO=do, PR="fp16", LR="2e-4", MIN_LR="1e-5")
        cfg = build_config([args[n] for n in ARG_NAMES], GEN, env={}, timestamp="T",
                           check_paths=False)
        arch = model_arch(cfg)
        mc = megatron_configs(cfg, arch, active_backend())
        chunks = build_model_chunks(arch, mc.transformer, **setup.ddp_kwargs(cfg))
        optimizer = build_optimizer(chunks, mc.transformer, **setup._optimizer_config_kwargs(cfg))
        assert _flat(chunks[0].ddp_config) == _flat(mc.ddp)
        assert _flat(optimizer.config) == _flat(mc.optimizer)
        assert optimizer.config.use_distributed_optimizer == (do == "true")
