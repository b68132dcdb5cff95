"""The converter entry (Pai-Megatron-Patch's hf2mcore contract)::

    python -m megatron_patch.conversion.cli MODEL_SIZE SOURCE_CKPT_PATH TARGET_CKPT_PATH \\
        TP PP mg2hf CHECK CHECK_ONLY PR [HF_CKPT_PATH]

MODEL_SIZE: ``auto`` (every shape from config.json) or GENERATION-SIZE (``llama3_1-8B``,
``llama2-13B``, ``llama-65B``, ``llama3_1-tiny``...), checked against config.json.
mg2hf=false: HF -> megatron-core at TP x PP; mg2hf=true: megatron-core (any layout, release
or iter_N, latest complete) -> HF safetensors. A SOURCE holding Meta's original files
(params.json + consolidated.NN.pth + tokenizer.model) is converted straight to megatron-core
(mg2hf=false) or to HF (mg2hf=true); HF_CKPT_PATH may then name an HF copy as the CHECK
reference. CHECK=true: per-layer parity table, exit 1 on failure (TARGET is then not
written). CHECK_ONLY=true: the check alone, nothing written.
PR: fp32 | bf16 | fp16 (dtype written and checked). HF_CKPT_PATH: config/tokenizer (and, for
a mg2hf check-only run, reference weights) of the HF model.

Environment: MP_OVERWRITE=1 replaces a non-empty TARGET (only after the new one is complete);
MP_PP0_LAYERS=N puts N layers on the first pipeline stage; MP_VP=N writes N virtual
pipeline chunks per PP rank (model0..model{N-1} in each rank file, megatron-core's
interleaved placement); MP_HF_SHARD_SIZE (bytes, or with
K/M/G suffix, default 4G) bounds HF shard files; MP_CHECK_LONG=0 skips the long llama3-rope
sequence in CHECK; MP_CHECK_LAYERS=0,15,31 checks only those decoder layers, each fed the
embedding output (faster; default: every layer, chained); MP_CKPT_FORMAT=torch_dist writes
megatron-core's distributed checkpoint format instead of per-rank files (any layout loads it;
reading detects the format); TQDM_DISABLE=1 hides the progress bar.

Exit codes: 0 done, 1 CHECK failed, 2 bad input (one line on stderr, TARGET untouched).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

from .errors import UsageError

USAGE = ("MODEL_SIZE SOURCE_CKPT_PATH TARGET_CKPT_PATH TP PP mg2hf CHECK CHECK_ONLY PR "
         "[HF_CKPT_PATH]")
PRECISIONS = ("fp32", "bf16", "fp16")
CKPT_FORMATS = ("torch", "torch_dist")


@dataclass
class Request:
    model_size: str
    source: str
    target: str
    tp: int
    pp: int
    mg2hf: bool
    check: bool
    check_only: bool
    precision: str
    hf_path: Optional[str]
    pp0_layers: Optional[int] = None
    vp: Optional[int] = None  # virtual pipeline chunks per PP rank (hf2mcore)
    overwrite: bool = False
    shard_bytes: int = 4 * 2**30
    check_layers: Optional[list] = None  # None: every layer, chained
    ckpt_format: str = "torch"  # megatron checkpoint written: torch | torch_dist


def _bool(name, v):
    if v not in ("true", "false"):
        raise UsageError(f"{name}={v!r}: choose true or false")
    return v == "true"


def _positive(name, v):
    if not v.isdigit() or int(v) < 1:
        raise UsageError(f"{name}={v!r}: must be a positive integer")
    return int(v)


def _size(v: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    v = v.strip().upper().rstrip("B")
    mult = units.get(v[-1:], 1)
    num = v[:-1] if v[-1:] in units else v
    try:
        return int(float(num) * mult)
    except ValueError:
        raise UsageError(f"MP_HF_SHARD_SIZE={v!r}: bytes, optionally with K/M/G") from None


def parse(argv) -> Request:
    if len(argv) not in (9, 10):
        raise UsageError(f"expected 9 or 10 arguments ({USAGE}), got {len(argv)}")
    size, source, target, tp, pp, mg2hf, check, check_only, pr = argv[:9]
    hf_path = argv[9] if len(argv) == 10 and argv[9] else None
    if pr not in PRECISIONS:
        raise UsageError(f"PR={pr!r}: choose fp32, bf16 or fp16")
    if size != "auto" and "-" not in size:
        raise UsageError(f"MODEL_SIZE={size!r}: use auto or GENERATION-SIZE, e.g. llama3_1-8B")
    req = Request(size, source, target, _positive("TP", tp), _positive("PP", pp),
                  _bool("mg2hf", mg2hf), _bool("CHECK", check),
                  _bool("CHECK_ONLY", check_only), pr, hf_path)
    if not os.path.exists(source):
        raise UsageError(f"SOURCE_CKPT_PATH={source}: does not exist")
    if hf_path and not os.path.isdir(hf_path):
        raise UsageError(f"HF_CKPT_PATH={hf_path}: not a directory")
    if not req.check_only and not target:
        raise UsageError("TARGET_CKPT_PATH is empty")
    pp0 = os.environ.get("MP_PP0_LAYERS", "")
    if pp0:
        if not pp0.isdigit():
            raise UsageError(f"MP_PP0_LAYERS={pp0!r}: must be a number of layers")
        req.pp0_layers = int(pp0)
    vp = os.environ.get("MP_VP", "")
    if vp and vp != "1":
        req.vp = _positive("MP_VP", vp)  # checked against PP and the layers with the model
    layers = os.environ.get("MP_CHECK_LAYERS", "").strip()
    if layers and layers != "all":
        items = layers.split(",")
        if not all(i.strip().isdigit() for i in items):
            raise UsageError(f"MP_CHECK_LAYERS={layers!r}: all, or layer numbers separated by "
                             f"commas (e.g. 0,15,31)")
        req.check_layers = sorted({int(i) for i in items})
    req.ckpt_format = os.environ.get("MP_CKPT_FORMAT", "torch") or "torch"
    if req.ckpt_format not in CKPT_FORMATS:
        raise UsageError(f"MP_CKPT_FORMAT={req.ckpt_format!r}: choose torch or torch_dist")
    req.overwrite = os.environ.get("MP_OVERWRITE", "0") == "1"
    if os.environ.get("MP_HF_SHARD_SIZE"):
        req.shard_bytes = _size(os.environ["MP_HF_SHARD_SIZE"])
    return req


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    req = None
    try:
        req = parse(argv)
        from .commands import run_hf2mcore, run_mg2hf
        from .meta_files import is_meta_checkpoint
        if os.path.isdir(req.source) and is_meta_checkpoint(req.source):
            from .meta_commands import run_meta
            return run_meta(req)
        return run_mg2hf(req) if req.mg2hf else run_hf2mcore(req)
    except (UsageError, ValueError, FileNotFoundError, KeyError, OSError) as e:
        if os.environ.get("MP_DEBUG") == "1":
            raise
        print(f"hf2mcore: error: {error_line(e, req)}", file=sys.stderr)
        return 2


def error_line(e: Exception, req: Optional[Request]) -> str:
    """The one line for a failed conversion; OS errors name the user's path (never our
    staging names) and say what to do."""
    from megatron_patch.fsutil import os_error_message, public_path
    if isinstance(e, KeyError):
        return f"missing entry {e.args[0]!r} (MP_DEBUG=1 shows where)" if e.args else str(e)
    if isinstance(e, OSError) and e.errno is not None:  # from the OS, not our own message
        target = os.path.abspath(req.target) if req is not None and req.target else None
        # a write that failed without a file name (os.write on a full disk) happened under
        # TARGET: the only place a conversion writes
        where = public_path(e.filename) if e.filename else target
        if target and where == target:
            return f"TARGET_CKPT_PATH={req.target}: {os_error_message(e, '')}"
        msg = os_error_message(e, where)
        if target and where and where.startswith(target + os.sep):
            msg = f"TARGET_CKPT_PATH={req.target}: {msg}"
        return msg
    return public_path(str(e))


if __name__ == "__main__":
    sys.exit(main())
