"""Converter commands for a Meta checkpoint folder as SOURCE_CKPT_PATH (found by its
params.json): mg2hf=false writes megatron-core at TP x PP, mg2hf=true writes HF safetensors.

CHECK compares transformers' model with megatron-core's, as for an HF source. The reference
is HF_CKPT_PATH when it gives an HF copy of the model (its config must describe the same
model): that also checks Meta's rotary layout conversion against the copy. Without one, the
reference is the Meta weights as read (converted to HF's layout), which checks everything
after the reading.
"""
from __future__ import annotations

import os
import time

from megatron_patch.checkpoint import fileio
from megatron_patch.models.llama import mapping
from megatron_patch.models.llama.arch import LlamaArch
from megatron_patch.models.llama.resolve import arch_differences, read_hf_config

from .commands import (DTYPES, has_weights, hf2mcore, hf_config_json, layout_checks,
                       progress_bar, run_check, staged, write_json)
from .errors import UsageError
from .hf2mcore import validate_hf
from .hf_files import HFCheckpoint, SafetensorsStreamWriter
from .meta_files import MetaCheckpoint, meta_arch
from .meta_tokenizer import write_hf_tokenizer
from .weights import HFAsMcore


def run_meta(req) -> int:
    meta = MetaCheckpoint(req.source)
    copy = None
    try:
        arch = meta_arch(meta, req.model_size)
        validate_hf(meta, arch)
        copy = _hf_copy(req, arch)
        if req.mg2hf:
            return _meta2hf(req, arch, meta, copy)
        layout_checks(arch, req.tp, req.pp, req.pp0_layers, req.vp)

        def side_files(staging):
            write_json(os.path.join(staging, "config.json"), hf_config_json(arch, req.precision))
            write_hf_tokenizer(req.source, staging, arch)

        return hf2mcore(req, arch, meta, copy or meta, side_files)
    finally:
        meta.close()
        if copy is not None:
            copy.close()


def _hf_copy(req, arch: LlamaArch):
    """HF_CKPT_PATH as the CHECK reference, or None when not given."""
    if not req.hf_path:
        return None
    if not has_weights(req.hf_path):
        raise UsageError(f"HF_CKPT_PATH={req.hf_path}: no HF weights (*.safetensors or "
                         f"pytorch_model*.bin) to check the Meta checkpoint against")
    cfg = os.path.join(req.hf_path, "config.json")
    if os.path.isfile(cfg):
        diffs = arch_differences(arch, read_hf_config(cfg))
        if diffs:
            raise UsageError(f"HF_CKPT_PATH config.json describes another model than "
                             f"{req.source}: {'; '.join(diffs)} (Meta vs HF)")
    copy = HFCheckpoint(req.hf_path)
    validate_hf(copy, arch)
    return copy


def copy_to_hf(reader, arch: LlamaArch, writer, progress: bool) -> None:
    """Every HF tensor from ``reader`` to ``writer`` in plan order; a tensor stored whole in
    the writer's dtype is copied file to file by the kernel."""
    from tqdm import tqdm
    plan = mapping.hf_tensor_plan(arch)
    for name, shape in tqdm(plan, unit="tensor", desc="meta->hf", disable=not progress,
                            dynamic_ncols=True):
        loc = reader.locate(name)
        if loc is not None and loc.dtype == writer.dtype:
            nbytes = reader.nbytes(name)
            writer.write_bytes(name, shape, fileio.Segments([(loc.fd, loc.offset, nbytes)]))
        else:
            (t,) = reader.read([name])
            writer.write(name, t)


def _meta2hf(req, arch, meta, copy) -> int:
    dtype, t0 = DTYPES[req.precision], time.time()
    if req.check_only:  # megatron-core on the Meta weights as read, against the reference
        test = HFAsMcore(meta, arch, 1, dtype)
        return 0 if run_check(copy or meta, test, arch, req, req.source) else 1

    files = []

    def write(staging):
        writer = SafetensorsStreamWriter(staging, mapping.hf_tensor_plan(arch), dtype,
                                         req.shard_bytes)
        copy_to_hf(meta, arch, writer, progress_bar())
        files.extend(writer.close())
        write_json(os.path.join(staging, "config.json"), hf_config_json(arch, req.precision))
        write_hf_tokenizer(req.source, staging, arch)

    def verify(staging):
        out = HFCheckpoint(staging)
        try:
            if copy is not None:  # the written files (run in megatron-core) against the copy
                return run_check(copy, HFAsMcore(out, arch, 1, dtype), arch, req, staging)
            return run_check(out, HFAsMcore(meta, arch, 1, dtype), arch, req, staging)
        finally:
            out.close()

    rc = staged(req, write, verify)
    if rc == 0:
        print(f"meta->hf: {req.source} ({len(meta.files)} model-parallel files) -> "
              f"{req.target} ({len(files)} safetensors files, {req.precision}) in "
              f"{time.time() - t0:.1f} s")
    return rc
