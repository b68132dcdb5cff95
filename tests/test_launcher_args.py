"""Every launcher argument is validated up front: a bad value gives exactly one line naming
the argument and the allowed values, a non-zero exit, and nothing is started or created.
Run under dash (``sh``) and bash, from an unrelated working directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from train_helpers import LAUNCHERS, ROOT, launcher_env

SHELLS = [s for s in ("sh", "bash") if shutil.which(s)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("argdata")
    for ext in (".bin", ".idx"):
        (d / f"corpus_text_document{ext}").write_bytes(b"")
    (d / "sft.json").write_text("[]")
    (d / "ckpt").mkdir()
    (d / "ckpt" / "latest_checkpointed_iteration.txt").write_text("release\n")
    (d / "ckpt" / "release" / "mp_rank_00").mkdir(parents=True)
    import torch
    torch.save({"model": {}}, d / "ckpt" / "release" / "mp_rank_00" / "model_optim_rng.pt")
    (d / "ckpt" / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, '
        '"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, '
        '"intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 512}')
    return d


def good_args(d) -> list:
    prefix = str(d / "corpus_text_document")
    return ["dsw", "tiny", "2", "8", "1e-5", "1e-6", "128", "128", "fp32", "1", "1", "1",
            "false", "false", "true", "false", "false", "false", "100", prefix, prefix, "none",
            "10240", "1024", str(d / "out")]


NAMES = ["ENV", "MODEL_SIZE", "BATCH_SIZE", "GLOBAL_BATCH_SIZE", "LR", "MIN_LR", "SEQ_LEN",
         "PAD_LEN", "PR", "TP", "PP", "CP", "SP", "DO", "FL", "SFT", "AC", "OPTIMIZER_OFFLOAD",
         "SAVE_INTERVAL", "DATASET_PATH", "VALID_DATASET_PATH", "PRETRAIN_CHECKPOINT_PATH",
         "TRAIN_TOKENS_OR_ITERS", "WARMUP_TOKENS_OR_ITERS", "OUTPUT_BASEPATH"]

# (argument, bad value, words the one-line error must contain)
BAD = [
    ("ENV", "local", ["ENV", "dsw|dlc"]),
    ("MODEL_SIZE", "7B", ["MODEL_SIZE", "8B|70B|405B|tiny|auto"]),
    ("MODEL_SIZE", "auto", ["MODEL_SIZE", "PRETRAIN_CHECKPOINT_PATH"]),
    ("BATCH_SIZE", "0", ["BATCH_SIZE", "integer"]),
    ("BATCH_SIZE", "two", ["BATCH_SIZE", "integer"]),
    ("GLOBAL_BATCH_SIZE", "-8", ["GLOBAL_BATCH_SIZE", "integer"]),
    ("GLOBAL_BATCH_SIZE", "9", ["GLOBAL_BATCH_SIZE", "multiple"]),
    ("LR", "fast", ["LR", "number"]),
    ("LR", "0", ["LR", "positive"]),
    ("MIN_LR", "1e-3", ["MIN_LR", "<= LR"]),
    ("SEQ_LEN", "1.5", ["SEQ_LEN", "integer"]),
    ("PAD_LEN", "x", ["PAD_LEN", "integer"]),
    ("PR", "fp9", ["PR", "fp16|bf16|fp8|fp32"]),
    ("TP", "0", ["TP", "integer"]),
    ("TP", "4", ["TP", "2 key/value heads"]),
    ("TP", "2", ["TP=2", "does not divide", "processes"]),
    ("PP", "3", ["PP", "4 layers"]),
    ("CP", "2", ["CP=2", "does not divide", "processes"]),  # one process on CPU
    ("CP", "0", ["CP", "integer"]),
    ("SP", "yes", ["SP", "true|false"]),
    ("DO", "1", ["DO", "true|false"]),
    ("FL", "True", ["FL", "true|false"]),
    ("SFT", "maybe", ["SFT", "true|false"]),
    ("AC", "none", ["AC", "sel|full|offload|false"]),
    ("OPTIMIZER_OFFLOAD", "always", ["OPTIMIZER_OFFLOAD", "false|static|auto"]),
    ("SAVE_INTERVAL", "0", ["SAVE_INTERVAL", "integer"]),
    ("DATASET_PATH", "/nonexistent/corpus", ["DATASET_PATH", ".bin", ".idx"]),
    ("VALID_DATASET_PATH", "/nonexistent/valid", ["VALID_DATASET_PATH", ".bin"]),
    ("PRETRAIN_CHECKPOINT_PATH", "/nonexistent/ckpt", ["PRETRAIN_CHECKPOINT_PATH", "none"]),
    ("TRAIN_TOKENS_OR_ITERS", "100", ["TRAIN_TOKENS_OR_ITERS", "1024"]),
    ("TRAIN_TOKENS_OR_ITERS", "1e9", ["TRAIN_TOKENS_OR_ITERS", "integer"]),
    ("WARMUP_TOKENS_OR_ITERS", "20480", ["WARMUP_TOKENS_OR_ITERS", "shorter"]),
    ("OUTPUT_BASEPATH", " ", ["OUTPUT_BASEPATH"]),
]


def _run(shell, args, env=None, generation="llama3_1"):
    return subprocess.run([shell, LAUNCHERS[generation]] + args, capture_output=True, text=True,
                          env=env or launcher_env(), cwd="/", timeout=60)


def _check_one_line_error(p, words, out_dir):
    assert p.returncode != 0, p.stdout + p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert "error:" in lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert p.stdout == ""
    assert not os.path.exists(out_dir), "nothing may be created for bad input"


@pytest.mark.parametrize("shell", SHELLS)
def test_bad_values(shell, data):
    """Table-driven: every row one clear line (both shells run the whole table)."""
    failures = []
    for name, value, words in BAD:
        args = good_args(data)
        args[NAMES.index(name)] = value
        p = _run(shell, args)
        try:
            _check_one_line_error(p, words, str(data / "out"))
        except AssertionError as exc:
            failures.append(f"{name}={value!r}: {exc}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("shell", SHELLS)
def test_argument_count(shell, data):
    for args in (good_args(data)[:24], good_args(data) + ["extra"], []):
        p = _run(shell, args)
        _check_one_line_error(p, ["expected 25 arguments", f"got {len(args)}"],
                              str(data / "out"))


def test_semantic_checks_with_env(data):
    """GBS vs MBS x DP from the process count, SP/TP, knobs, dlc variables, SFT data."""
    def err(args, **env):
        p = _run("sh", args, env=launcher_env(**env))
        _check_one_line_error(p, [], str(data / "out"))
        return p.stderr

    a = good_args(data)
    a[NAMES.index("GLOBAL_BATCH_SIZE")] = "6"
    assert "GLOBAL_BATCH_SIZE" in err(a, MP_NPROC=2) and "data-parallel size 2" in err(a, MP_NPROC=2)
    a = good_args(data)
    a[NAMES.index("TP")], a[NAMES.index("SP")] = "2", "true"
    a[NAMES.index("SEQ_LEN")] = "127"
    assert "SEQ_LEN" in err(a, MP_NPROC=2)
    a = good_args(data)
    assert "MP_DATASET_TYPE" in err(a, MP_DATASET_TYPE="json")
    assert "MP_VP" in err(a, MP_VP="2")
    assert "MP_AC_LAYERS" in err(a, MP_AC_LAYERS="0")
    a[NAMES.index("PP")] = "2"
    assert "MP_VP" in err(a, MP_VP="4", MP_NPROC=2)
    assert "MP_PP0_LAYERS" in err(a, MP_PP0_LAYERS="4", MP_NPROC=2)
    a = good_args(data)
    a[NAMES.index("ENV")] = "dlc"
    assert "MASTER_ADDR" in err(a)
    a = good_args(data)
    a[NAMES.index("SFT")] = "true"
    a[NAMES.index("TRAIN_TOKENS_OR_ITERS")] = "10"
    a[NAMES.index("WARMUP_TOKENS_OR_ITERS")] = "1"
    assert "_sft_meta.json" in err(a)  # idxmap SFT wants an SFT idxmap prefix
    sft = str(data / "sft.json")
    a[NAMES.index("DATASET_PATH")] = a[NAMES.index("VALID_DATASET_PATH")] = "/nonexistent.json"
    assert "MP_DATASET_TYPE=raw" in err(a, MP_DATASET_TYPE="raw")
    a[NAMES.index("DATASET_PATH")] = a[NAMES.index("VALID_DATASET_PATH")] = sft
    a[NAMES.index("PAD_LEN")] = "256"
    assert "PAD_LEN" in err(a, MP_DATASET_TYPE="raw")


def test_plan(data):
    """The plan the launcher evals: torchrun layout, Pai's run name and output folders."""
    from megatron_patch.training.arguments import build_config
    from megatron_patch.training.config import ConfigError
    from megatron_patch.training.launch_plan import plan
    args = good_args(data)
    cfg = build_config(args, "llama3_1", env={}, timestamp="2026.01.01-00.00.00")
    # tokens / (GBS x SEQ_LEN)
    assert cfg.optim.train_iters == 10 and cfg.optim.warmup_iters == 1
    assert cfg.run_name == ("pretrain-mcore-llama3-1-tiny-lr-1e-5-minlr-1e-6-bs-2-gbs-8-"
                            "seqlen-128-pr-fp32-tp-1-pp-1-cp-1-ac-false-do-false-sp-false-"
                            "ti-10-wi-1")
    out = str(data / "out")
    assert cfg.checkpoint_dir == os.path.join(out, "checkpoint", cfg.run_name)
    assert cfg.log_file == os.path.join(out, "log", cfg.run_name + "_2026.01.01-00.00.00.log")
    assert cfg.tensorboard_dir == os.path.join(out, "tensorboard",
                                               cfg.run_name + "_2026.01.01-00.00.00")
    p = plan(cfg, {"MP_NPROC": "4", "MP_MASTER_PORT": "29500", "MASTER_PORT": "1"})
    assert (p.NPROC, p.NNODES, p.DP, p.MASTER_PORT) == (4, 1, 4, 29500)
    dlc = list(args)
    dlc[0] = "dlc"
    cfg = build_config(dlc, "llama3_1", env={})
    p = plan(cfg, {"MP_NPROC": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456",
                   "WORLD_SIZE": "2", "RANK": "1"})
    assert (p.NPROC, p.NNODES, p.NODE_RANK, p.MASTER_ADDR, p.DP) == (2, 2, 1, "10.0.0.1", 4)
    with pytest.raises(ConfigError, match="RANK=2 is not valid"):
        plan(cfg, {"MP_NPROC": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456",
                   "WORLD_SIZE": "2", "RANK": "2"})
    # SFT counts iterations; SP with TP=1 is a note, not silence
    sft = list(args)
    sft[NAMES.index("SFT")], sft[NAMES.index("SP")] = "true", "true"
    sft[NAMES.index("DATASET_PATH")] = sft[NAMES.index("VALID_DATASET_PATH")] = \
        str(data / "sft.json")
    sft[NAMES.index("TRAIN_TOKENS_OR_ITERS")], sft[NAMES.index("WARMUP_TOKENS_OR_ITERS")] = \
        "30", "3"
    cfg = build_config(sft, "llama3_1", env={"MP_DATASET_TYPE": "raw"})
    assert (cfg.optim.train_iters, cfg.optim.warmup_iters, cfg.data.sft,
            cfg.parallel.sequence_parallel) == (30, 3, True, False)
    assert cfg.run_name.startswith("finetune-mcore-llama3-1-tiny-")
    assert any("SP=true has no effect with TP=1" in n for n in cfg.notes)
    # context parallelism: CP counts in the data-parallel size; SEQ_LEN (PAD_LEN for SFT)
    # splits into 2 x CP chunks; packed SFT rows cannot be split; MP_CP_COMM_TYPE is TE's
    cp = list(args)
    cp[NAMES.index("CP")] = "2"
    cfg = build_config(cp, "llama3_1", env={})
    assert (cfg.parallel.cp, cfg.parallel.cp_comm_type) == (2, "p2p")
    assert "-cp-2-" in cfg.run_name
    assert plan(cfg, {"MP_NPROC": "4"}).DP == 2
    cp[NAMES.index("SEQ_LEN")] = "126"
    cp[NAMES.index("TRAIN_TOKENS_OR_ITERS")] = "100800"
    with pytest.raises(ConfigError, match="SEQ_LEN=126 is not valid: must be a multiple of "
                                          "2 x CP = 4"):
        build_config(cp, "llama3_1", env={})
    cp_sft = list(sft)
    cp_sft[NAMES.index("CP")] = "2"
    cfg = build_config(cp_sft, "llama3_1", env={"MP_DATASET_TYPE": "raw"})
    assert cfg.parallel.cp == 2 and cfg.data.sft
    with pytest.raises(ConfigError, match="MP_SFT_PACKING='true' is not supported with CP=2"):
        build_config(cp_sft, "llama3_1", env={"MP_DATASET_TYPE": "raw",
                                              "MP_SFT_PACKING": "true"})
    cp_sft[NAMES.index("PAD_LEN")] = "126"
    with pytest.raises(ConfigError, match="PAD_LEN=126 is not valid: must be a multiple of"):
        build_config(cp_sft, "llama3_1", env={"MP_DATASET_TYPE": "raw"})
    with pytest.raises(ConfigError, match="MP_CP_COMM_TYPE='ring' is not valid"):
        build_config(args, "llama3_1", env={"MP_CP_COMM_TYPE": "ring"})
    cp[NAMES.index("SEQ_LEN")] = "128"
    cp[NAMES.index("TRAIN_TOKENS_OR_ITERS")] = "10240"
    cfg = build_config(cp, "llama3_1", env={"MP_CP_COMM_TYPE": "a2a"})
    assert cfg.parallel.cp_comm_type == "a2a"
    assert any("MP_CP_COMM_TYPE=a2a applies to Transformer Engine" in n for n in cfg.notes)
    # auto reads config.json next to the checkpoint: TP must divide its 2 KV heads
    auto = list(args)
    auto[NAMES.index("MODEL_SIZE")] = "auto"
    auto[NAMES.index("PRETRAIN_CHECKPOINT_PATH")] = str(data / "ckpt")
    auto[NAMES.index("TP")] = "4"
    with pytest.raises(ConfigError, match="TP=4.*2 key/value heads"):
        build_config(auto, "llama3_1", env={})
    # a published size on a checkpoint whose config.json describes another model: refused
    # at once (it would otherwise build the 8B model and fail minutes later)
    big = list(args)
    big[NAMES.index("MODEL_SIZE")] = "8B"
    big[NAMES.index("PRETRAIN_CHECKPOINT_PATH")] = str(data / "ckpt")
    with pytest.raises(ConfigError, match="MODEL_SIZE=8B disagrees with .*config.json: "
                                          "hidden_size 4096 vs 64"):
        build_config(big, "llama3_1", env={})


def test_launcher_needs_generation(data):
    env = launcher_env()
    p = subprocess.run(["sh", os.path.join(ROOT, "examples", "llama", "run_mcore_llama.sh")]
                       + good_args(data), capture_output=True, text=True, env=env, cwd="/")
    assert p.returncode == 2 and "MP_GENERATION" in p.stderr


def test_validation_is_fast(data):
    """No torch import before validation: a rejected command returns in well under a second
    of CPU (the table above runs ~70 launcher invocations)."""
    import time
    t = time.process_time()
    r0 = os.times()
    p = _run("sh", good_args(data)[:3])
    r1 = os.times()
    assert p.returncode == 2
    assert (r1.children_user + r1.children_system) - (r0.children_user + r0.children_system) < 1.0
    del t


def test_dataset_path_with_spaces_is_one_path(data, tmp_path):
    """A prefix whose directory has a space is one dataset, not a two-path blend."""
    from megatron_patch.training.arguments import build_config
    d = tmp_path / "my data"
    d.mkdir()
    for ext in (".bin", ".idx"):
        (d / f"corpus_text_document{ext}").write_bytes(b"")
    prefix = str(d / "corpus_text_document")
    args = good_args(data)
    args[NAMES.index("DATASET_PATH")] = args[NAMES.index("VALID_DATASET_PATH")] = prefix
    cfg = build_config(args, "llama3_1", env={})
    assert cfg.data.train_paths == [prefix] and cfg.data.valid_paths is None
    # the blend syntax still splits
    args[NAMES.index("DATASET_PATH")] = f"0.5 {data / 'corpus_text_document'} " \
                                        f"0.5 {data / 'corpus_text_document'}"
    cfg = build_config(args, "llama3_1", env={})
    assert len(cfg.data.train_paths) == 4


def test_sequence_beyond_the_context_is_stated(data):
    """SEQ_LEN past max_position_embeddings trains, but never silently."""
    from megatron_patch.training.arguments import build_config
    args = good_args(data)
    cfg = build_config(args, "llama3_1", env={})  # 128 tokens, tiny context 512
    assert not any("context" in n for n in cfg.notes)
    args[NAMES.index("SEQ_LEN")] = args[NAMES.index("PAD_LEN")] = "1024"
    args[NAMES.index("TRAIN_TOKENS_OR_ITERS")] = str(8 * 1024 * 10)
    args[NAMES.index("WARMUP_TOKENS_OR_ITERS")] = str(8 * 1024)
    cfg = build_config(args, "llama3_1", env={})
    assert any("SEQ_LEN=1024 exceeds the model's 512-token context" in n for n in cfg.notes)
