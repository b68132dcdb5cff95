"""Measure the converter CHECK's bf16/fp16 drift: the largest relative difference between
transformers and megatron-core over all CHECK points of a *correct* conversion, per model
shape, next to the tolerance CHECK applies (megatron_patch/conversion/check.py quotes these
numbers). Runs the converter's command (CHECK_ONLY, nothing written) on random-init HF
checkpoints in a temporary directory.

    python tools/check_drift.py                          # tiny presets, bf16 and fp16
    python tools/check_drift.py --shapes 1024x16,4096x4 --precisions bf16

Shapes: ``tiny:<generation>`` (that generation's tiny preset) or ``HIDDENxLAYERS`` (Llama-3.1
layout, 64-dim heads, 4 query heads per KV head, FFN ~2.75 x hidden, vocab 32000). Memory:
about 4 x the parameter count in bytes (4096x4: ~1e9 parameters).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile

ROW = re.compile(r"^(embedding|decoder layer \d+|final norm|logits)\s+\S+\s+\S+\s+(\S+)\s+(\S+)")
HEADER = re.compile(r"pass if rel <= (\S+) and cosine >= (\S+);")


def arch_for(shape: str):
    from megatron_patch.conversion.synthetic import small_arch
    from megatron_patch.models.llama.presets import get_preset
    if shape.startswith("tiny:"):
        return get_preset(shape[5:], "tiny")
    hidden, layers = (int(x) for x in shape.lower().split("x"))
    return small_arch("llama3_1", vocab_size=32000, hidden_size=hidden, num_layers=layers,
                      ffn_hidden_size=int(hidden * 2.75) // 64 * 64,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256))


def measure(src: str, precision: str) -> tuple:
    """(largest rel over the CHECK points, the tolerance's rtol) of one CHECK_ONLY run."""
    from megatron_patch.conversion import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["auto", src, os.path.join(src, "unused"), "1", "1", "false", "false",
                       "true", precision])
    text = out.getvalue()
    rels = [float(m.group(2)) for m in map(ROW.match, text.splitlines()) if m]
    header = HEADER.search(text)
    if rc not in (0, 1) or not rels or header is None:
        raise SystemExit(f"check_drift: error: the converter failed on {src}: "
                         f"{(err.getvalue() or text).strip()[-500:]}")
    return max(rels), float(header.group(1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny:llama,tiny:llama2,tiny:llama3,tiny:llama3_1")
    p.add_argument("--precisions", default="bf16,fp16")
    a = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from megatron_patch.conversion.synthetic import write_hf_checkpoint
    print(f"{'shape':<16} {'precision':<9} {'max rel':>9} {'rtol':>9} {'rel/rtol':>8}")
    worst = 0.0
    for shape in a.shapes.split(","):
        arch = arch_for(shape)
        with tempfile.TemporaryDirectory(prefix="check_drift_") as tmp:
            write_hf_checkpoint(tmp, arch, dtype=torch.float32)
            for precision in a.precisions.split(","):
                rel, rtol = measure(tmp, precision)
                worst = max(worst, rel / rtol)
                print(f"{shape:<16} {precision:<9} {rel:>9.2e} {rtol:>9.3g} {rel / rtol:>8.2f}",
                      flush=True)
    print(f"largest share of the tolerance a correct conversion used: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
