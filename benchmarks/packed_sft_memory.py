"""Packed SFT memory: THD (PackedSeqParams, what MP_SFT_PACKING runs now) vs the dense
[b, 1, s, s] block-diagonal mask it replaced, measured in the same run.

For each packed length s, one forward + backward of a small Llama (2 layers, hidden 128,
2 heads / 1 KV group, fp32) on one packed row of samples of 200-1000 tokens, in a fresh
process per (path, s) so each peak is its own: the peak increase of the process's resident
memory over a warm-up (CPU), or torch.cuda.max_memory_allocated over what is allocated
before (CUDA). Prints both curves, the dense / THD ratio, and how each grows per doubling
of s (2x: linear; 4x: quadratic).

    python benchmarks/packed_sft_memory.py [--seqs 1024,2048,4096,8192]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MiB = 2.0 ** 20


def _sample_lengths(s: int):
    import numpy as np
    rng = np.random.RandomState(s)
    lengths, used = [], 0
    while used < s:
        n = int(rng.randint(200, 1001))
        lengths.append(min(n, s - used))
        used += lengths[-1]
    return lengths


def measure(path: str, s: int) -> dict:
    """One forward + backward on a packed row of s tokens; peak bytes above the baseline."""
    import resource

    import torch

    import megatron_patch  # noqa: F401  (selects the backend)
    from megatron_patch import parallel
    from megatron_patch.backends import active_backend
    from megatron_patch.data.sft_dataset import pack_boundaries
    from megatron_patch.models.llama import LlamaArch
    from megatron_patch.models.llama.config import transformer_config
    from megatron_patch.models.llama.provider import build_llama
    from megatron_patch.training import packed_seq

    parallel.init_distributed()
    parallel.initialize_model_parallel()
    dev = active_backend().device()
    arch = LlamaArch(hidden_size=128, num_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, ffn_hidden_size=256, vocab_size=1000,
                     max_position_embeddings=s, rope_theta=10000.0, norm_eps=1e-5,
                     generation="llama2")
    torch.manual_seed(0)
    model = build_llama(arch, transformer_config(arch)).to(dev)
    lengths = _sample_lengths(s)

    def step(n: int, lens):
        row = pack_boundaries(lens, n)
        tokens = torch.randint(0, arch.vocab_size, (1, n))
        labels = torch.randint(0, arch.vocab_size, (1, n))
        if path == "thd":
            batch = packed_seq.merge_rows([row["cu_seqlens"]], n)
            batch.update(tokens=tokens, labels=labels, position_ids=row["position_ids"][None])
            flat, params = packed_seq.to_thd(batch, dev)
            loss = model(flat["tokens"], flat["position_ids"], None, labels=flat["labels"],
                         packed_seq_params=params)
        else:
            cu = row["cu_seqlens"].long()
            seg = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.diff(cu))
            keep = (seg[:, None] == seg[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
            loss = model(tokens.to(dev), torch.arange(n)[None].to(dev), (~keep)[None, None].to(dev),
                         labels=labels.to(dev))
        loss.sum().backward()
        model.zero_grad(set_to_none=True)

    step(256, [100, 156])  # warm-up: kernels, allocator, gradients' first allocation
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(s, lengths)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step(s, lengths)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"path": path, "seq": s, "samples": len(lengths), "peak_bytes": peak,
            "device": dev.type}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="1024,2048,4096,8192")
    ap.add_argument("--one", nargs=2, metavar=("PATH", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return 0
    seqs = [int(x) for x in args.seqs.split(",")]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("MASTER_PORT", None)
    res = {}
    for s in seqs:
        for path in ("dense", "thd"):
            p = subprocess.run([sys.executable, __file__, "--one", path, str(s)], env=env,
                               capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{path} at {s}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                return 1
            res[(path, s)] = json.loads(p.stdout.strip().splitlines()[-1])
    dev = res[("thd", seqs[0])]["device"]
    print(f"packed SFT, one row, forward + backward, peak memory above warm-up ({dev}):")
    print(f"{'seq':>6} {'samples':>7} {'dense mask MiB':>15} {'THD MiB':>9} {'dense/THD':>10}"
          f" {'dense growth':>13} {'THD growth':>11}")
    prev = None
    for s in seqs:
        d, t = res[("dense", s)]["peak_bytes"], res[("thd", s)]["peak_bytes"]
        growth = ("", "") if prev is None else (f"{d / prev[0]:.2f}x", f"{t / prev[1]:.2f}x")
        print(f"{s:>6} {res[('thd', s)]['samples']:>7} {d / MiB:>15.1f} {t / MiB:>9.1f} "
              f"{d / max(t, 1):>9.1f}x {growth[0]:>13} {growth[1]:>11}")
        prev = (d, t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
