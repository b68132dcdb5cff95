"""A corpus of bad inputs across every command a user runs (issue 16): the training launcher
(its argument check, and the trainer for data it can only judge by reading it), the
converter, the data tools, evaluation's preflight and the generate/chat CLIs.

Every case asserts what a user must get:
- a non-zero exit status,
- exactly one line on stderr, naming the problem and the argument or file,
- no traceback, no internal temporary name (``.tmp123``, ``.staging``) in it, and never a
  bare key such as ``hidden_size`` as the whole message,
- no output that looks complete: no file appears that a later step would take for a
  result (a tracker file, a .bin/.idx pair, safetensors, an SFT meta file, a converted
  model...) -- only the trainer's own log and TensorBoard files may appear.

Most cases call the command's ``main(argv)`` in this process (milliseconds each); the shell
wrappers are run as subprocesses only where the wrapper itself is what is tested.

Also here: the disk-full cases (a converter write and a trainer checkpoint save that meet
ENOSPC, by fault injection at the file-write calls) and a read-only output directory (the
kernel's EACCES, injected when the tests run as root, whom permissions do not stop).
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Tuple

import pytest

from train_helpers import ROOT, launcher_env

TRACKER = "latest_checkpointed_iteration.txt"
TMP_NAME = re.compile(r"\.tmp\d+|\.staging|\.old-?\d+")


# ---- fault injection ---------------------------------------------------------------------------
def _under(path, root) -> bool:
    p = os.path.realpath(path)
    return p == root or p.startswith(root + os.sep)


def _fd_path(fd) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class _FailingFile:
    """A file opened for writing on a failing device: every write raises ``err``."""

    def __init__(self, real, err):
        self._real, self._err = real, err

    def write(self, data):
        if len(data):
            raise self._err()
        return 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()


class FailingDevice:
    """Writes under ``root`` fail with ``code`` (ENOSPC: the disk is full; EACCES: a read-only
    directory) while ``armed``: os.write / copy_file_range / sendfile (what the converter's
    streaming writers and shutil use), files opened for writing with open() (torch.save's
    file object), and (EACCES only) creating directories and files. Like the kernel's
    write(2), an ENOSPC carries no file name."""

    def __init__(self, monkeypatch, root, code=errno.ENOSPC, armed=True):
        self.root, self.code, self.armed = os.path.realpath(root), code, armed
        self.hits = 0
        real_write, real_open, real_mkdir = os.write, builtins.open, os.mkdir
        real_os_open = os.open

        def err(path=None):
            self.hits += 1
            if self.code == errno.ENOSPC:
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return PermissionError(self.code, os.strerror(self.code), path)

        def hit(path):
            return self.armed and path and _under(path, self.root)

        def write(fd, data):
            if len(data) and hit(_fd_path(fd)):
                raise err(_fd_path(fd))
            return real_write(fd, data)

        def copy_file_range(src, dst, *a, **k):
            if hit(_fd_path(dst)):
                raise err(_fd_path(dst))
            return real_copy_file_range(src, dst, *a, **k)

        def sendfile(out_fd, *a, **k):
            if hit(_fd_path(out_fd)):
                raise err(_fd_path(out_fd))
            return real_sendfile(out_fd, *a, **k)

        def open_(file, mode="r", *a, **k):
            writing = isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+")
            if writing and hit(os.fspath(file)):
                if self.code != errno.ENOSPC:
                    raise err(os.fspath(file))
                return _FailingFile(real_open(file, mode, *a, **k), err)
            return real_open(file, mode, *a, **k)

        def mkdir(path, *a, **k):
            if self.code != errno.ENOSPC and hit(os.path.dirname(os.path.abspath(path))):
                raise err(path)
            return real_mkdir(path, *a, **k)

        def os_open(path, flags, *a, **k):
            if self.code != errno.ENOSPC and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) \
                    and hit(path):
                raise err(path)
            return real_os_open(path, flags, *a, **k)

        real_copy_file_range, real_sendfile = os.copy_file_range, os.sendfile
        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "copy_file_range", copy_file_range)
        monkeypatch.setattr(os, "sendfile", sendfile)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "open", os_open)


def read_only_dir(path, monkeypatch):
    """``path`` made read-only: chmod, and for root (whom the mode does not stop) the
    kernel's answer EACCES injected on every write under it."""
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o555)
    if os.geteuid() == 0:
        FailingDevice(monkeypatch, path, code=errno.EACCES)


# ---- the inputs --------------------------------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    with open(path, "w") as f:
        json.dump(cfg, f)
    return folder


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def _cut(path, keep=0.5):
    os.truncate(path, int(os.path.getsize(path) * keep))


@pytest.fixture(scope="module")
def inputs(world, tmp_path_factory):
    """Every bad input of the corpus, made once: damaged copies of the world's HF model and
    Megatron checkpoint, broken data files, a regular file, a tokenizer that is not the
    model's."""
    d = tmp_path_factory.mktemp("bad_inputs")
    p = SimpleNamespace(w=world, dir=str(d), hf=world.hf, ck=world.release, tok=world.tokenizer,
                        corpus=world.corpus)
    # HF model folders
    p.hf_trunc = _copy(world.hf, d / "hf_trunc")
    _cut(os.path.join(p.hf_trunc, "model.safetensors"))
    p.hf_four = _edit_config(_copy(world.hf, d / "hf_four"), num_attention_heads="four")
    p.hf_neg = _edit_config(_copy(world.hf, d / "hf_neg"), num_hidden_layers=-1)
    p.hf_nohidden = _edit_config(_copy(world.hf, d / "hf_nohidden"), hidden_size=None)
    p.hf_badjson = _copy(world.hf, d / "hf_badjson")
    _write(os.path.join(p.hf_badjson, "config.json"), '{"hidden_size": 64,')
    p.hf_list = _copy(world.hf, d / "hf_list")
    _write(os.path.join(p.hf_list, "config.json"), "[64, 4]")
    p.hf_badindex = _copy(world.hf, d / "hf_badindex")
    _write(os.path.join(p.hf_badindex, "model.safetensors.index.json"), '{"weight_map": ')
    p.hf_nomap = _copy(world.hf, d / "hf_nomap")
    _write(os.path.join(p.hf_nomap, "model.safetensors.index.json"), '{"metadata": {}}')
    p.hf_garbage = _copy(world.hf, d / "hf_garbage")
    _write(os.path.join(p.hf_garbage, "model.safetensors"), "not a model " * 50)
    p.hf_noweights = _copy(world.hf, d / "hf_noweights")
    os.remove(os.path.join(p.hf_noweights, "model.safetensors"))
    # the model (vocab 512) with the Llama-3 tokenizer (128,256 tokens) beside it
    from megatron_patch.tokenizer import write_llama3_tokenizer_dir
    p.hf_bigtok = str(d / "hf_bigtok")
    write_llama3_tokenizer_dir(p.hf_bigtok)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(os.path.join(world.hf, name), p.hf_bigtok)
    # Megatron checkpoints
    p.ck_trunc = _copy(world.release, d / "ck_trunc")
    _cut(os.path.join(p.ck_trunc, "release", "mp_rank_00", "model_optim_rng.pt"), 1 / 3)
    p.ck_four = _edit_config(_copy(world.release, d / "ck_four"), num_attention_heads="four")
    p.ck_badjson = _copy(world.release, d / "ck_badjson")
    _write(os.path.join(p.ck_badjson, "config.json"), "{")
    p.ck_nohidden = _edit_config(_copy(world.release, d / "ck_nohidden"), hidden_size=None)
    # data files
    p.docs = _write(d / "docs.jsonl", '{"text": "hello world"}\n{"text": "more text"}\n')
    p.empty_json = _write(d / "empty.json", "")
    p.empty_jsonl = _write(d / "empty.jsonl", "")
    p.nokeys = _write(d / "nokeys.json", json.dumps([{"title": "no text here"}] * 5))
    p.badarray = _write(d / "bad.json", '[{"text": "a"}, {"text": ')
    p.xml = _write(d / "a.xml", "<doc/>")
    p.afile = _write(d / "afile", "a regular file\n")
    p.tok_badjson = _copy(world.tokenizer, d / "tok_badjson")
    os.remove(os.path.join(p.tok_badjson, "tokenizer.model"))
    _write(os.path.join(p.tok_badjson, "tokenizer.json"), "{")
    p.ro = str(d / "ro")
    os.makedirs(p.ro)
    # the heavy imports happen here, with their import-time warnings, not inside a case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron_patch.conversion.commands  # noqa: F401
        import megatron_patch.inference.chat  # noqa: F401
        import megatron_patch.training.loop  # noqa: F401
    return p


# ---- the corpus --------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    tool: str
    argv: Callable  # (inputs with .out) -> list of arguments
    words: Tuple[str, ...]  # the one line holds each: the problem and the argument/file
    env: dict = field(default_factory=dict)
    read_only: bool = False  # inputs.ro is made read-only for the case


def L(**over):
    """The launcher's 25 arguments (a valid tiny pretraining run), with ``over`` replaced;
    values may be callables of the inputs."""
    a = dict(ENV="dsw", MODEL_SIZE="auto", BATCH_SIZE=1, GLOBAL_BATCH_SIZE=4, LR="1e-3",
             MIN_LR="0", SEQ_LEN=32, PAD_LEN=32, PR="fp32", TP=1, PP=1, CP=1, SP="false",
             DO="false", FL="false", SFT="false", AC="false", OPTIMIZER_OFFLOAD="false",
             SAVE_INTERVAL=1, DATASET_PATH=lambda p: p.corpus,
             VALID_DATASET_PATH=lambda p: p.corpus,
             PRETRAIN_CHECKPOINT_PATH=lambda p: p.ck, TRAIN_TOKENS_OR_ITERS=2 * 4 * 32,
             WARMUP_TOKENS_OR_ITERS=0, OUTPUT_BASEPATH=lambda p: p.out)
    a.update(over)
    return lambda p: [str(v(p) if callable(v) else v) for v in a.values()]


def SFT_RAW(data):
    return L(SFT="true", DATASET_PATH=data, VALID_DATASET_PATH="none", TRAIN_TOKENS_OR_ITERS=2)


def CONV(source, target=None, tp=1, pp=1, mg2hf="false", check="false", pr="fp32",
         size="auto", hf=None):
    def argv(p):
        v = [size, source(p), (target or (lambda q: q.out))(p), tp, pp, mg2hf, check,
             "false", pr]
        return [str(x) for x in v] + ([hf(p)] if hf else [])
    return argv


def PRE(inp, tok=None, prefix=None, extra=()):
    return lambda p: ["--input", inp(p), "--tokenizer-name-or-path", (tok or (lambda q: q.tok))(p),
                      "--output-prefix", (prefix or (lambda q: os.path.join(q.out, "o")))(p),
                      "--quiet", *extra]


def SFTB(inp, extra=(), generation=("--generation", "llama2")):
    return lambda p: ["--input", inp(p), "--tokenizer-name-or-path", p.tok, "--output-prefix",
                      os.path.join(p.out, "s"), "--seq-length", "64", "--quiet", *generation,
                      *extra]


def ALP(inp, out=None, extra=()):
    return lambda p: ["--data_path", inp(p), "--output_path",
                      (out or (lambda q: os.path.join(q.out, "conv.json")))(p), *extra]


def EVAL(model, args, tasks="mp_tiny_mmlu"):
    return lambda p: ["--model", model, "--model_args", args(p), "--tasks", tasks,
                      "--include_path", os.path.join(ROOT, "LM-Evaluation-Harness", "tasks")]


def GEN(load, *extra):
    return lambda p: ["--load", load(p), "--prompt", "Hello", "--max-new-tokens", "2",
                      *[e(p) if callable(e) else e for e in extra]]


CASES = [
    # -- launcher: the argument check before anything starts (launch_plan) -------------------
    Case("launch-cut-pretrain-checkpoint", "launcher",
         L(PRETRAIN_CHECKPOINT_PATH=lambda p: p.ck_trunc),
         ("PRETRAIN_CHECKPOINT_PATH", "ck_trunc", "truncated")),
    Case("launch-size-7B-on-tiny-checkpoint", "launcher", L(MODEL_SIZE="7B"),
         ("MODEL_SIZE=7B", "disagrees", "config.json", "hidden_size 4096 vs 64")),
    Case("launch-size-8B-llama3_1-on-tiny-checkpoint", "launcher:llama3_1", L(MODEL_SIZE="8B"),
         ("MODEL_SIZE=8B", "disagrees", "config.json")),
    Case("launch-config-heads-four", "launcher", L(PRETRAIN_CHECKPOINT_PATH=lambda p: p.ck_four),
         ("ck_four/config.json", "num_attention_heads='four'")),
    Case("launch-config-not-json", "launcher",
         L(PRETRAIN_CHECKPOINT_PATH=lambda p: p.ck_badjson),
         ("ck_badjson/config.json", "not valid JSON")),
    Case("launch-checkpoint-missing", "launcher",
         L(PRETRAIN_CHECKPOINT_PATH=lambda p: os.path.join(p.dir, "nope")),
         ("PRETRAIN_CHECKPOINT_PATH", "nope")),
    Case("launch-data-missing", "launcher", L(DATASET_PATH=lambda p: os.path.join(p.dir, "nod")),
         ("DATASET_PATH", "nod.bin")),
    Case("launch-data-with-bin-suffix", "launcher", L(DATASET_PATH=lambda p: p.corpus + ".bin"),
         ("DATASET_PATH", "without .bin")),
    Case("launch-raw-sft-file-missing", "launcher",
         SFT_RAW(lambda p: os.path.join(p.dir, "missing.json")),
         ("DATASET_PATH", "missing.json", "MP_DATASET_TYPE=raw"), env={"MP_DATASET_TYPE": "raw"}),
    Case("launch-lr-not-a-number", "launcher", L(LR="abc"), ("LR='abc'", "number")),
    Case("launch-lr-nan", "launcher", L(LR="nan"), ("LR='nan'", "finite")),
    Case("launch-min-lr-above-lr", "launcher", L(MIN_LR="1"), ("MIN_LR='1'", "LR=1e-3")),
    Case("launch-seq-len-1", "launcher", L(SEQ_LEN=1), ("SEQ_LEN='1'", ">= 2")),
    Case("launch-precision", "launcher", L(PR="fp64"), ("PR='fp64'", "fp16|bf16|fp8|fp32")),
    Case("launch-tp-not-dividing-heads", "launcher", L(TP=3), ("TP=3", "key/value heads")),
    Case("launch-env", "launcher", L(ENV="local"), ("ENV='local'", "dsw|dlc")),
    Case("launch-output-is-a-file", "launcher", L(OUTPUT_BASEPATH=lambda p: p.afile),
         ("OUTPUT_BASEPATH", "afile", "existing file")),
    Case("launch-output-under-a-file", "launcher",
         L(OUTPUT_BASEPATH=lambda p: os.path.join(p.afile, "out")),
         ("OUTPUT_BASEPATH", "afile", "is a file")),
    Case("launch-nproc-not-a-number", "launcher", L(), ("MP_NPROC='x'",), env={"MP_NPROC": "x"}),
    Case("launch-warmup-longer-than-training", "launcher", L(WARMUP_TOKENS_OR_ITERS=10000),
         ("WARMUP_TOKENS_OR_ITERS=10000", "shorter")),
    Case("launch-resume-from-missing", "launcher", L(),
         ("MP_RESUME_FROM", "gone"), env={"MP_RESUME_FROM": "/nonexistent/gone"}),
    Case("launch-pp0-layers-too-many", "launcher", L(PP=2),
         ("MP_PP0_LAYERS=9", "between 1 and 3"), env={"MP_PP0_LAYERS": "9"}),
    Case("launch-too-few-arguments", "launcher", lambda p: ["dsw", "auto"],
         ("expected 25 arguments, got 2",)),
    # -- trainer: SFT data it can only judge by reading it ------------------------------------
    Case("train-sft-json-missing-keys", "train", SFT_RAW(lambda p: p.nokeys),
         ("nokeys.json", "no SFT samples", "unknown SFT record"),
         env={"MP_DATASET_TYPE": "raw"}),
    Case("train-sft-json-empty", "train", SFT_RAW(lambda p: p.empty_json),
         ("empty.json", "no SFT samples", "empty"), env={"MP_DATASET_TYPE": "raw"}),
    # -- converter ------------------------------------------------------------------------------
    Case("convert-truncated-safetensors", "convert", CONV(lambda p: p.hf_trunc),
         ("hf_trunc/model.safetensors", "truncated")),
    Case("convert-heads-four", "convert", CONV(lambda p: p.hf_four),
         ("hf_four/config.json", "num_attention_heads='four'")),
    Case("convert-negative-layers", "convert", CONV(lambda p: p.hf_neg),
         ("hf_neg/config.json", "num_hidden_layers=-1")),
    Case("convert-config-missing-hidden-size", "convert", CONV(lambda p: p.hf_nohidden),
         ("hf_nohidden/config.json", "hidden_size")),
    Case("convert-config-not-json", "convert", CONV(lambda p: p.hf_badjson),
         ("hf_badjson/config.json", "not valid JSON")),
    Case("convert-config-a-list", "convert", CONV(lambda p: p.hf_list),
         ("hf_list/config.json", "JSON object")),
    Case("convert-index-not-json", "convert", CONV(lambda p: p.hf_badindex),
         ("hf_badindex/model.safetensors.index.json", "not valid JSON")),
    Case("convert-index-without-weight-map", "convert", CONV(lambda p: p.hf_nomap),
         ("hf_nomap/model.safetensors.index.json", "weight_map")),
    Case("convert-not-safetensors", "convert", CONV(lambda p: p.hf_garbage),
         ("hf_garbage/model.safetensors", "not a safetensors file")),
    Case("convert-no-weights", "convert", CONV(lambda p: p.hf_noweights),
         ("hf_noweights", "no model weights")),
    Case("convert-tokenizer-larger-than-vocab", "convert", CONV(lambda p: p.hf_bigtok),
         ("SOURCE_CKPT_PATH", "hf_bigtok", "128256 tokens", "holds 512")),
    Case("convert-size-8B-on-tiny-model", "convert",
         CONV(lambda p: p.hf, size="llama3_1-8B"),
         ("MODEL_SIZE=llama3_1-8B", "disagrees", "config.json")),
    Case("convert-target-is-a-file", "convert", CONV(lambda p: p.hf, target=lambda p: p.afile),
         ("TARGET_CKPT_PATH", "afile", "existing file", "remove it")),
    Case("convert-target-under-a-file", "convert",
         CONV(lambda p: p.hf, target=lambda p: os.path.join(p.afile, "t")),
         ("TARGET_CKPT_PATH", "afile", "is a file")),
    Case("convert-target-read-only", "convert",
         CONV(lambda p: p.hf, target=lambda p: os.path.join(p.ro, "t")),
         ("TARGET_CKPT_PATH", "ro/t", "permission denied"), read_only=True),
    Case("convert-target-not-empty", "convert", CONV(lambda p: p.hf, target=lambda p: p.dir),
         ("TARGET_CKPT_PATH", "not empty", "MP_OVERWRITE=1")),
    Case("convert-mg2hf-cut-checkpoint", "convert", CONV(lambda p: p.ck_trunc, mg2hf="true"),
         ("ck_trunc", "mp_rank_00/model_optim_rng.pt", "truncated")),
    Case("convert-mg2hf-config-missing-hidden-size", "convert",
         CONV(lambda p: p.ck_nohidden, mg2hf="true"),
         ("ck_nohidden/config.json", "hidden_size")),
    Case("convert-mg2hf-hf-path-missing", "convert",
         CONV(lambda p: p.ck, mg2hf="true", hf=lambda p: os.path.join(p.dir, "nohf")),
         ("HF_CKPT_PATH", "nohf")),
    Case("convert-source-missing", "convert", CONV(lambda p: os.path.join(p.dir, "nosrc")),
         ("SOURCE_CKPT_PATH", "nosrc", "does not exist")),
    Case("convert-tp-zero", "convert", CONV(lambda p: p.hf, tp=0), ("TP='0'", "positive")),
    Case("convert-tp-not-dividing-heads", "convert", CONV(lambda p: p.hf, tp=3),
         ("TP=3", "key/value heads")),
    Case("convert-precision", "convert", CONV(lambda p: p.hf, pr="fp64"), ("PR='fp64'",)),
    Case("convert-mg2hf-not-bool", "convert", CONV(lambda p: p.hf, mg2hf="yes"),
         ("mg2hf='yes'", "true or false")),
    Case("convert-argument-count", "convert", lambda p: ["auto", p.hf],
         ("expected 9 or 10 arguments", "got 2")),
    Case("convert-check-layer-missing", "convert", CONV(lambda p: p.hf, check="true"),
         ("MP_CHECK_LAYERS", "layer 7"), env={"MP_CHECK_LAYERS": "7"}),
    Case("convert-pp0-layers-too-many", "convert", CONV(lambda p: p.hf, pp=2),
         ("MP_PP0_LAYERS=9", "between 1 and 3"), env={"MP_PP0_LAYERS": "9"}),
    Case("convert-shard-size", "convert", CONV(lambda p: p.hf), ("MP_HF_SHARD_SIZE",),
         env={"MP_HF_SHARD_SIZE": "lots"}),
    # -- data tools -------------------------------------------------------------------------------
    Case("preprocess-input-missing", "preprocess",
         PRE(lambda p: os.path.join(p.dir, "nope.jsonl")), ("nope.jsonl", "no such file")),
    Case("preprocess-input-empty", "preprocess", PRE(lambda p: p.empty_jsonl),
         ("empty.jsonl", "no records")),
    Case("preprocess-records-missing-key", "preprocess", PRE(lambda p: p.nokeys),
         ("nokeys.json", "missing key 'text'")),
    Case("preprocess-malformed-json-array", "preprocess", PRE(lambda p: p.badarray),
         ("bad.json", "malformed JSON")),
    Case("preprocess-unsupported-type", "preprocess", PRE(lambda p: p.xml),
         ("a.xml", "unsupported")),
    Case("preprocess-tokenizer-missing", "preprocess",
         PRE(lambda p: p.docs, tok=lambda p: os.path.join(p.dir, "notok")),
         ("notok", "tokenizer")),
    Case("preprocess-tokenizer-json-broken", "preprocess",
         PRE(lambda p: p.docs, tok=lambda p: p.tok_badjson),
         ("tok_badjson/tokenizer.json", "not valid JSON")),
    Case("preprocess-output-under-a-file", "preprocess",
         PRE(lambda p: p.docs, prefix=lambda p: os.path.join(p.afile, "o")),
         ("--output-prefix", "afile", "is a file")),
    Case("preprocess-workers-zero", "preprocess", PRE(lambda p: p.docs, extra=["--workers", "0"]),
         ("--workers",)),
    Case("preprocess-handler", "preprocess",
         PRE(lambda p: p.docs, extra=["--handler-name", "Nope"]), ("--handler-name", "Nope")),
    Case("sft-data-empty-json", "sft", SFTB(lambda p: p.empty_json),
         ("empty.json", "no SFT samples", "no records")),
    Case("sft-data-missing-keys", "sft", SFTB(lambda p: p.nokeys),
         ("nokeys.json", "no SFT samples", "unknown SFT record")),
    Case("sft-data-malformed", "sft", SFTB(lambda p: p.badarray), ("bad.json", "malformed")),
    Case("sft-data-seq-length", "sft", SFTB(lambda p: p.nokeys, ["--seq-length", "1"]),
         ("--seq-length",)),
    Case("sft-data-tokenizer-type", "sft",
         SFTB(lambda p: p.nokeys, ["--patch-tokenizer-type", "Foo"], generation=()),
         ("--patch-tokenizer-type", "Foo")),
    Case("alpaca-missing-keys", "alpaca", ALP(lambda p: p.nokeys),
         ("nokeys.json", "missing key 'instruction'")),
    Case("alpaca-empty", "alpaca", ALP(lambda p: p.empty_json), ("empty.json", "no records")),
    Case("alpaca-malformed", "alpaca", ALP(lambda p: p.badarray), ("bad.json", "malformed")),
    Case("alpaca-output-is-a-directory", "alpaca", ALP(lambda p: p.w.sft_json, lambda p: p.dir),
         ("--output_path", "is a directory")),
    Case("alpaca-output-is-the-input", "alpaca",
         ALP(lambda p: p.w.sft_json, lambda p: p.w.sft_json), ("--output_path", "also the input")),
    Case("alpaca-output-extension", "alpaca",
         ALP(lambda p: p.w.sft_json, lambda p: os.path.join(p.out, "c.txt")),
         ("--output_path", "c.txt", ".jsonl")),
    Case("alpaca-output-under-a-file", "alpaca",
         ALP(lambda p: p.w.sft_json, lambda p: os.path.join(p.afile, "c.json")),
         ("--output_path", "afile", "is a file")),
    # -- evaluation preflight ----------------------------------------------------------------------
    Case("eval-cut-megatron-checkpoint", "eval",
         EVAL("megatron_patch", lambda p: f"load={p.ck_trunc},tp=1,pp=1"),
         ("load=", "ck_trunc", "truncated")),
    Case("eval-hf-truncated-safetensors", "eval", EVAL("hf", lambda p: f"pretrained={p.hf_trunc}"),
         ("hf_trunc/model.safetensors", "truncated")),
    Case("eval-hf-config-not-json", "eval", EVAL("hf", lambda p: f"pretrained={p.hf_badjson}"),
         ("hf_badjson/config.json", "not valid JSON")),
    Case("eval-hf-missing", "eval",
         EVAL("hf", lambda p: f"pretrained={os.path.join(p.dir, 'nomodel')}"),
         ("nomodel", "not found")),
    Case("eval-megatron-given-hf-folder", "eval", EVAL("megatron_patch", lambda p: f"load={p.hf}"),
         ("not a Megatron checkpoint", "--model hf")),
    Case("eval-mmlu-data-missing", "eval",
         EVAL("hf", lambda p: f"pretrained={p.hf}", tasks="mmlu_local"), ("MMLU_DIR",)),
    # -- generate / chat ---------------------------------------------------------------------------
    Case("generate-cut-checkpoint", "generate", GEN(lambda p: p.ck_trunc),
         ("ck_trunc", "truncated")),
    Case("generate-checkpoint-missing", "generate", GEN(lambda p: os.path.join(p.dir, "nock")),
         ("nock", "not found")),
    Case("generate-config-heads-four", "generate", GEN(lambda p: p.ck_four),
         ("ck_four/config.json", "num_attention_heads='four'")),
    Case("generate-tokenizer-missing", "generate",
         GEN(lambda p: p.ck, "--tokenizer", lambda p: os.path.join(p.dir, "notok")),
         ("notok", "tokenizer")),
    Case("generate-tokenizer-larger-than-vocab", "generate",
         GEN(lambda p: p.ck, "--tokenizer", lambda p: p.hf_bigtok),
         ("--tokenizer", "hf_bigtok", "128256 tokens", "holds 512")),
    Case("generate-top-p", "generate", GEN(lambda p: p.ck, "--top-p", "2"), ("top_p", "2.0")),
    Case("generate-no-prompt", "generate", lambda p: ["--load", p.ck], ("--prompt", "required")),
    Case("generate-size-mismatch", "generate", GEN(lambda p: p.ck, "--model-size", "llama2-7B"),
         ("llama2-7B", "disagrees")),
    Case("chat-cut-checkpoint", "chat", lambda p: ["--load", p.ck_trunc], ("ck_trunc", "truncated")),
    Case("chat-template-missing", "chat",
         lambda p: ["--load", p.ck, "--chat-template", os.path.join(p.dir, "t.jinja")],
         ("--chat-template", "t.jinja")),
]

MODULES = {
    "launcher": "megatron_patch.training.launch_plan",
    "train": "megatron_patch.training.pretrain",
    "convert": "megatron_patch.conversion.cli",
    "preprocess": "megatron_patch.data.preprocess_cli",
    "sft": "megatron_patch.data.sft_cli",
    "alpaca": "megatron_patch.data.alpaca_cli",
    "eval": "megatron_patch.evaluation.preflight",
    "generate": "megatron_patch.inference.generate",
    "chat": "megatron_patch.inference.chat",
}


def _files(*roots) -> set:
    out = set()
    for root in roots:
        for d, _, names in os.walk(root):
            out.update(os.path.join(d, n) for n in names)
    return out


def _clean_env(monkeypatch, env):
    for k in list(os.environ):
        if k.startswith("MP_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MEGATRON_PATCH_BACKEND", "cpu")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def run_main(tool, argv, capsys, monkeypatch):
    """``main(argv)`` of the tool in this process -> (exit status, stdout, stderr)."""
    import importlib
    name, _, generation = tool.partition(":")
    main = importlib.import_module(MODULES[name]).main
    if name == "launcher":
        argv = [generation or "llama2"] + argv
    elif name == "train":
        argv = ["--generation", "llama2", "--"] + argv
        # a worker ties its life to its launcher's (parent-death signal): not this process
        from megatron_patch.training import lifetime
        monkeypatch.setattr(lifetime, "tie_to_launcher", lambda: None)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(rc, out, err, words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc not in (0, None), (rc, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    missing = [w for w in words if w not in line]
    assert not missing, (missing, line)
    assert not TMP_NAME.search(line), line  # never our temporary names
    assert not re.search(r"error: '?\w+'?$", line), line  # never a bare key as the message
    return line


def looks_complete(new_files) -> list:
    """New files a later step would take for a result (the trainer's logs are allowed)."""
    return sorted(f for f in new_files
                  if os.sep + "log" + os.sep not in f and os.sep + "tensorboard" + os.sep not in f)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, inputs, tmp_path, monkeypatch, capsys):
    p = SimpleNamespace(**vars(inputs), out=str(tmp_path / "out"))
    _clean_env(monkeypatch, case.env)
    argv = case.argv(p)
    before = _files(tmp_path, inputs.dir)
    if case.read_only:
        read_only_dir(inputs.ro, monkeypatch)
    try:
        rc, out, err = run_main(case.tool, argv, capsys, monkeypatch)
    finally:
        monkeypatch.undo()  # the fault injection and env end here
        os.chmod(inputs.ro, 0o755)
    line = assert_one_line(rc, out, err, case.words)
    if case.id == "convert-target-is-a-file":
        assert "File exists" not in line
    if case.id == "convert-config-missing-hidden-size":
        assert line.rstrip().endswith("(not a Llama config.json?)")
    assert looks_complete(_files(tmp_path, inputs.dir) - before) == [], line


def test_corpus_size():
    """The issue asks for at least 60 cases over launcher, converter, data, eval, generate."""
    tools = {c.tool.partition(":")[0] for c in CASES}
    assert len(CASES) + len(SHELL_CASES) >= 60
    assert {"launcher", "train", "convert", "preprocess", "sft", "alpaca", "eval",
            "generate", "chat"} <= tools


# ---- the shell wrappers (their own checks, and what they print from Python) ---------------------
def _sh(script, *args):
    shell = "bash" if "convertor" in script else "sh"  # the converter scripts are bash
    return subprocess.run([shell, os.path.join(ROOT, script), *[str(a) for a in args]],
                          env=launcher_env(), capture_output=True, text=True, timeout=120)


CONVERTER_SH = "toolkits/model_checkpoints_convertor/llama/hf2mcore_convertor_llama3_1.sh"
SHELL_CASES = [
    ("run_eval-cut-megatron-checkpoint", "LM-Evaluation-Harness/run_eval.sh",
     lambda p: [p.ck_trunc, "mp_tiny_mmlu", "1"], ("ck_trunc", "truncated")),
    ("run_eval-batch-size-zero", "LM-Evaluation-Harness/run_eval.sh",
     lambda p: [p.ck, "mp_tiny_mmlu", "0"], ("BATCH_SIZE=0",)),
    ("converter-sh-argument-count", CONVERTER_SH, lambda p: ["auto", p.hf, p.out],
     ("expected 9 or 10 arguments", "got 3")),
    ("converter-sh-bad-tp", CONVERTER_SH,
     lambda p: ["auto", p.hf, p.out, "x", "1", "false", "false", "false", "fp32"], ("TP='x'",)),
    ("launcher-sh-output-is-a-file", "examples/llama2/run_mcore_llama2.sh",
     lambda p: L(OUTPUT_BASEPATH=lambda q: q.afile)(p), ("OUTPUT_BASEPATH", "existing file")),
    ("preprocess-sh-workers", "toolkits/pretrain_data_preprocessing/run_make_pretraining_dataset.sh",
     lambda p: [p.docs, p.tok, os.path.join(p.out, "o"), "zero"], ("WORKERS", "zero")),
]


@pytest.mark.parametrize("case", SHELL_CASES, ids=[c[0] for c in SHELL_CASES])
def test_bad_input_shell(case, inputs, tmp_path):
    _, script, argv, words = case
    p = SimpleNamespace(**vars(inputs), out=str(tmp_path / "out"))
    before = _files(tmp_path, inputs.dir)
    r = _sh(script, *argv(p))
    assert_one_line(r.returncode, r.stdout, r.stderr, words)
    assert looks_complete(_files(tmp_path, inputs.dir) - before) == []


# ---- a full disk (ENOSPC) ----------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["hf2mcore", "mg2hf"])
def test_converter_on_a_full_disk(direction, inputs, tmp_path, monkeypatch, capsys):
    """Every write under the target's folder fails with ENOSPC (the kernel's write(2) names no
    file): one line saying the disk is full and where, exit 2, no TARGET, no staging left."""
    _clean_env(monkeypatch, {})
    out = tmp_path / "space"
    out.mkdir()
    target = str(out / "t")
    src, mg2hf = (inputs.hf, "false") if direction == "hf2mcore" else (inputs.ck, "true")
    disk = FailingDevice(monkeypatch, str(out))
    rc, o, err = run_main("convert", CONV(lambda p: src, lambda p: target, mg2hf=mg2hf)(inputs),
                          capsys, monkeypatch)
    monkeypatch.undo()
    assert disk.hits >= 1  # the fault was met, not avoided
    line = assert_one_line(rc, o, err, (f"TARGET_CKPT_PATH={target}", "no space left on device",
                                        "the disk is full"))
    assert rc == 2 and os.listdir(out) == [], (line, os.listdir(out))


@pytest.mark.parametrize("fills_after", ["commit_save", "write_companions"])
def test_trainer_checkpoint_save_on_a_full_disk(fills_after, world, tmp_path, monkeypatch,
                                                capsys):
    """The disk fills up after the first checkpoint is committed: while its companion files
    (config.json, tokenizer) are written, or at the second save. One line naming the file
    and the full disk, exit 2; the tracker still names iteration 1, which loads; no
    iter_0000002 and no temporary file left behind."""
    import megatron_patch.checkpoint as ckpt_lib
    from megatron_patch.checkpoint import find_checkpoint
    from megatron_patch.training import checkpointing
    _clean_env(monkeypatch, {"MP_EVAL_ITERS": "0"})
    out = str(tmp_path / "out")
    argv = L(OUTPUT_BASEPATH=lambda p: out)(SimpleNamespace(corpus=world.corpus, ck=world.release))
    disk = FailingDevice(monkeypatch, os.path.join(out, "checkpoint"), armed=False)
    owner = ckpt_lib if fills_after == "commit_save" else checkpointing
    real = getattr(owner, fills_after)
    calls = []

    def then_the_disk_is_full(*a, **k):
        calls.append(fills_after)
        r = real(*a, **k)
        disk.armed = True
        return r
    monkeypatch.setattr(owner, fills_after, then_the_disk_is_full)
    rc, o, err = run_main("train", argv, capsys, monkeypatch)
    monkeypatch.undo()
    assert calls == [fills_after] and disk.hits >= 1
    root = os.path.join(out, "checkpoint", os.listdir(os.path.join(out, "checkpoint"))[0])
    failed = os.path.join(root, "config.json") if fills_after == "commit_save" else \
        os.path.join(root, "iter_0000002", "mp_rank_00", "model_optim_rng.pt")
    line = assert_one_line(rc, o, err, ("no space left on device", "the disk is full",
                                        f"({failed})"))
    assert rc == 2, line
    assert open(os.path.join(root, TRACKER)).read().strip() == "1"
    assert find_checkpoint(root).iteration == 1
    assert not os.path.exists(os.path.join(root, "iter_0000002"))
    leftovers = [f for f in _files(root) if TMP_NAME.search(os.path.basename(f))]
    assert leftovers == []


@pytest.mark.parametrize("internal,public", [
    ("/r/.staging.iter_0000005/mp_rank_00/model_optim_rng.pt.tmp123",
     "/r/iter_0000005/mp_rank_00/model_optim_rng.pt"),
    ("/r/.staging.release", "/r/release"),
    ("/a/.t.staging-55/release/x", "/a/t/release/x"),
    ("/a/.tokenizer.json.tmp99", "/a/tokenizer.json"),
    ("/a/latest_checkpointed_iteration.txt.tmp12", "/a/latest_checkpointed_iteration.txt"),
    ("cannot move '/a/iter_0000002.old12' to '/a/x.tmp3'", "cannot move '/a/iter_0000002' to '/a/x'"),
    ("/a/model.tmp", "/a/model.tmp"),  # not one of ours: kept
])
def test_messages_name_the_real_file(internal, public):
    """The staging and temporary names our atomic writers use never reach a message."""
    from megatron_patch.fsutil import os_error_message, public_path
    assert public_path(internal) == public
    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), internal)
    assert os_error_message(e) == (f"no space left on device, the disk is full ({public}): "
                                   "free space there or choose another output directory; "
                                   "nothing was published")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_rank_file_on_a_full_device_names_the_file(tmp_path, monkeypatch):
    """The kernel's own ENOSPC (/dev/full): torch.save given a path reports it as a C++
    stream error without errno (what users saw: 'basic_ios::clear: iostream error' or
    'unexpected pos'); save_rank_file writes through a Python file and reports ENOSPC with
    the checkpoint file's name, leaving no temporary file."""
    import torch

    from megatron_patch.checkpoint import save as save_mod
    state = {"model": {"w": torch.ones(4096)}}
    with pytest.raises(RuntimeError) as raw:  # the reference: the path API loses the errno
        torch.save(state, "/dev/full")
    assert not isinstance(raw.value, OSError)
    real_open = builtins.open
    monkeypatch.setattr(save_mod, "open", lambda f, mode="r", *a, **k: real_open(
        "/dev/full", mode, *a, **k) if "w" in mode else real_open(f, mode, *a, **k),
        raising=False)
    target = str(tmp_path / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt")
    with pytest.raises(OSError) as e:
        save_mod.save_rank_file(target, state)
    assert e.value.errno == errno.ENOSPC and e.value.filename == target
    assert os.listdir(os.path.dirname(target)) == []
