"""The two directions of the converter command, from validated arguments (cli.Request):
check everything that can be checked before writing, convert into a staging directory,
run CHECK on what was written, then publish it as TARGET."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Optional

import torch

from megatron_patch.checkpoint import (begin_save, checkpoint_state, commit_save,
                                       find_checkpoint, make_args)
from megatron_patch.checkpoint.load import checkpoint_arch, open_source
from megatron_patch.models.llama import mapping
from megatron_patch.models.llama.arch import LlamaArch
from megatron_patch.models.llama.parallel_layout import LayoutError, check_layout
from megatron_patch.models.llama.resolve import (ArchError, arch_differences, read_hf_config,
                                                 resolve_arch)

from .errors import UsageError
from .hf2dist import hf_to_dist
from .hf2mcore import FileSink, hf_to_mcore, validate_hf
from .hf_files import HFCheckpoint, SafetensorsStreamWriter, copy_side_files
from .mcore2hf import mcore_to_hf
from .target import check_target, make_staging, publish
from .weights import HFAsMcore, McoreAsHF, SourceWeights

# (not models.llama.config.DTYPES: that module imports megatron-core, which a conversion
# without CHECK does not need)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def progress_bar() -> bool:
    return os.environ.get("TQDM_DISABLE", "") not in ("1", "true", "True")


def layout_checks(arch, tp: int, pp: int, pp0, vp=None) -> None:
    try:
        check_layout(arch, tp=tp, pp=pp, vp=vp, pp0_layers=pp0)
    except LayoutError as e:
        raise UsageError(str(e)) from None


def check_tokenizer_fits(tok_dir: Optional[str], arch, name: str) -> None:
    """A tokenizer whose ids run past the model's vocabulary is the wrong tokenizer for it
    (every id >= vocab_size would index past the embedding): refused before converting,
    not copied along to fail later in training."""
    from megatron_patch.tokenizer import TokenizerError, tokenizer_size
    if not tok_dir or not os.path.isdir(tok_dir):
        return
    try:
        n = tokenizer_size(tok_dir)
    except TokenizerError as e:
        raise UsageError(f"{name}={tok_dir}: {e}") from None
    if n is not None and n > arch.vocab_size:
        raise UsageError(f"{name}={tok_dir}: its tokenizer has {n} tokens but the model's "
                         f"vocabulary (vocab_size) holds {arch.vocab_size}: this is not the "
                         f"model's tokenizer; put the model's own tokenizer files there")


def run_check(ref, test, arch, req, tokenizer_dir) -> bool:
    """The streamed per-point table (stream_check): ``ref`` HF side, ``test`` megatron side."""
    from .stream_check import stream_parity  # imports transformers: only when checking
    if req.check_layers is not None:
        bad = [i for i in req.check_layers if i >= arch.num_layers]
        if bad:
            raise UsageError(f"MP_CHECK_LAYERS: layer {bad[0]} does not exist (the model has "
                             f"{arch.num_layers} layers, 0-{arch.num_layers - 1})")
    result = stream_parity(ref, test, arch, req.precision, tokenizer_dir, req.check_layers,
                           emit=lambda line: print(line, flush=True))
    return result.ok


def staged(req, write, verify) -> int:
    """write(staging dir); verify(staging dir) -> bool (CHECK); publish only when both pass."""
    check_target(req)
    staging = make_staging(req.target)
    try:
        write(staging)
        if req.check and not verify(staging):
            shutil.rmtree(staging, ignore_errors=True)
            print(f"TARGET {req.target} not written (CHECK failed)", file=sys.stderr)
            return 1
        publish(staging, req.target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return 0


# ---- HF -> megatron-core -------------------------------------------------------------------
def run_hf2mcore(req) -> int:
    src = req.source
    if not os.path.isdir(src):
        raise UsageError(f"SOURCE_CKPT_PATH={src}: not a directory")
    try:
        has_cfg = os.path.isfile(os.path.join(src, "config.json"))
        arch = resolve_arch(req.model_size, hf_config=src if has_cfg else None)
    except ArchError as e:
        raise UsageError(str(e)) from None
    layout_checks(arch, req.tp, req.pp, req.pp0_layers, req.vp)
    check_tokenizer_fits(src, arch, "SOURCE_CKPT_PATH")
    hf = HFCheckpoint(src)

    def side_files(staging):  # config.json and the tokenizer files go along
        cfg = os.path.join(src, "config.json")
        if os.path.isfile(cfg):
            shutil.copy2(cfg, os.path.join(staging, "config.json"))
        else:
            write_json(os.path.join(staging, "config.json"), hf_config_json(arch, req.precision))
        copy_side_files(src, staging)

    try:
        validate_hf(hf, arch)
        return hf2mcore(req, arch, hf, hf, side_files)
    finally:
        hf.close()


def hf2mcore(req, arch, reader, ref, side_files) -> int:
    """``reader`` (HFCheckpoint's interface) -> megatron-core at TP x PP; CHECK compares the
    result with ``ref`` (HF side); ``side_files(staging)`` adds config and tokenizer files."""
    src, dtype, t0 = req.source, DTYPES[req.precision], time.time()

    if req.check_only:  # the conversion's tensors at TP, merged back, one at a time
        test = HFAsMcore(reader, arch, req.tp, dtype)
        return 0 if run_check(ref, test, arch, req, src) else 1

    def write(staging):
        iter_dir = begin_save(staging, "release")
        args = make_args(arch, req.tp, req.pp, req.precision, vp=req.vp,
                         pp0_layers=req.pp0_layers)
        if req.ckpt_format == "torch_dist":
            common = checkpoint_state([], "release", args)
            hf_to_dist(reader, arch, req.tp, dtype, iter_dir, common, progress_bar())
        else:
            hf_to_mcore(reader, arch, req.tp, req.pp, dtype,
                        FileSink(iter_dir, req.pp, args, vp=req.vp), req.pp0_layers,
                        progress_bar(), vp=req.vp)
        commit_save(staging, "release")
        side_files(staging)

    def verify(staging):  # the files just written, each tensor merged from its shards
        source = open_source(find_checkpoint(staging))
        try:
            return run_check(ref, SourceWeights(source, arch), arch, req, staging)
        finally:
            source.close()

    rc = staged(req, write, verify)
    if rc == 0:
        layout = "torch_dist" if req.ckpt_format == "torch_dist" else \
            f"TP={req.tp} PP={req.pp}" + (f" VP={req.vp}" if req.vp else "")
        print(f"hf->mcore: {src} -> {req.target} (release, {layout}, {req.precision}) in "
              f"{time.time() - t0:.1f} s")
    return rc


# ---- megatron-core -> HF -------------------------------------------------------------------
def hf_config_json(arch, precision: str, template_dir: Optional[str] = None) -> dict:
    """config.json for the exported model: the template's own (same model) when there is
    one, so every field and its rope settings survive, else one generated from the arch."""
    cfg = None
    tpl = os.path.join(template_dir, "config.json") if template_dir else None
    if tpl and os.path.isfile(tpl):
        read_hf_config(tpl)  # a damaged file: one line naming it
        with open(tpl) as f:
            cand = json.load(f)
        if not arch_differences(LlamaArch.from_hf_config(cand), arch):
            cfg = cand
    if cfg is None:
        cfg = arch.to_hf_config()
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    cfg["torch_dtype"] = name
    if "dtype" in cfg:
        cfg["dtype"] = name
    return cfg


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _mcore_arch(req, ckpt, source) -> LlamaArch:
    """The checkpoint's model (its args, a config.json beside it, or HF_CKPT_PATH's),
    cross-checked against HF_CKPT_PATH's config.json and MODEL_SIZE."""
    arch = checkpoint_arch(ckpt, source)
    hf_cfg = os.path.join(req.hf_path, "config.json") if req.hf_path else None
    if hf_cfg and not os.path.isfile(hf_cfg):
        hf_cfg = None
    if arch is None:
        if hf_cfg is None:
            raise UsageError(f"{req.source}: the checkpoint carries no model description and "
                             f"there is no config.json beside it; give HF_CKPT_PATH")
        arch = read_hf_config(hf_cfg)
    elif hf_cfg:
        diffs = arch_differences(arch, read_hf_config(hf_cfg))
        if diffs:
            raise UsageError(f"HF_CKPT_PATH config.json disagrees with the checkpoint: "
                             f"{'; '.join(diffs)} (checkpoint vs config)")
    if req.model_size != "auto":
        diffs = arch_differences(resolve_arch(req.model_size), arch)
        if diffs:
            raise UsageError(f"MODEL_SIZE={req.model_size} disagrees with the checkpoint "
                             f"{ckpt.path}: {'; '.join(diffs)} (preset vs checkpoint)")
    return arch


def has_weights(path: Optional[str]) -> bool:
    if not path:
        return False
    try:
        hf = HFCheckpoint(path)
    except FileNotFoundError:
        return False
    hf.close()
    return bool(hf.files)


def run_mg2hf(req) -> int:
    ckpt = find_checkpoint(req.source)
    source = open_source(ckpt)
    try:
        return _mg2hf(req, ckpt, source)
    finally:
        source.close()


def _mg2hf(req, ckpt, source) -> int:
    arch = _mcore_arch(req, ckpt, source)
    side_src = req.hf_path or ckpt.root  # config/tokenizer files
    check_tokenizer_fits(side_src, arch, "HF_CKPT_PATH" if req.hf_path else "SOURCE_CKPT_PATH")
    dtype, t0 = DTYPES[req.precision], time.time()

    if req.check_only:  # the checkpoint against HF_CKPT_PATH's weights (else its own export)
        ref = HFCheckpoint(req.hf_path) if has_weights(req.hf_path) else McoreAsHF(source, arch)
        try:
            ok = run_check(ref, SourceWeights(source, arch), arch, req, side_src)
        finally:
            getattr(ref, "close", lambda: None)()
        return 0 if ok else 1

    files = []
    config = hf_config_json(arch, req.precision, side_src)  # checked before writing

    def write(staging):
        writer = SafetensorsStreamWriter(staging, mapping.hf_tensor_plan(arch), dtype,
                                         req.shard_bytes)
        mcore_to_hf(source, arch, writer, progress_bar())
        files.extend(writer.close())
        write_json(os.path.join(staging, "config.json"), config)
        copy_side_files(side_src, staging)

    def verify(staging):  # the exported HF files against the megatron checkpoint
        ref = HFCheckpoint(staging)
        try:
            return run_check(ref, SourceWeights(source, arch), arch, req, staging)
        finally:
            ref.close()

    rc = staged(req, write, verify)
    if rc == 0:
        layout = "torch_dist" if ckpt.format == "torch_dist" else f"TP={ckpt.tp} PP={ckpt.pp}"
        print(f"mcore->hf: {ckpt.path} ({layout}) -> {req.target} "
              f"({len(files)} safetensors files, {req.precision}) in {time.time() - t0:.1f} s")
    return rc
