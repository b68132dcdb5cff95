"""Core attention: megatron_patch's SDPAttention vs megatron-core's local DotProductAttention.

Same TransformerConfig, same q/k/v, causal, GQA; forward+backward timed in the same run on
whatever device the active backend uses. Prints both times and the speed-up ratio, and
checks the two outputs agree (so the comparison is between equal computations).

    python benchmarks/attention_sdpa_vs_local.py [--seq 1024] [--batch 2] [--heads 8] [--groups 2]
"""
from __future__ import annotations

import argparse
import time

import torch

import megatron_patch  # noqa: F401  (selects the backend)
from megatron_patch import parallel
from megatron_patch.backends import active_backend


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()

    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.transformer.sdpa_attention import SDPAttention

    parallel.init_distributed()
    parallel.initialize_model_parallel()
    dev = active_backend().device()
    cfg = TransformerConfig(num_layers=1, hidden_size=args.heads * args.head_dim,
                            num_attention_heads=args.heads, num_query_groups=args.groups,
                            kv_channels=args.head_dim, masked_softmax_fusion=False,
                            attention_softmax_in_fp32=True, use_cpu_initialization=True,
                            attention_dropout=0.0, hidden_dropout=0.0)
    impls = {"megatron local DotProductAttention": DotProductAttention,
             "megatron_patch SDPAttention": SDPAttention}
    g = torch.Generator().manual_seed(0)
    s, b, h, n, d = args.seq, args.batch, args.heads, args.groups, args.head_dim
    q = torch.randn(s, b, h, d, generator=g).to(dev)
    k = torch.randn(s, b, n, d, generator=g).to(dev)
    v = torch.randn(s, b, n, d, generator=g).to(dev)
    times, outs = {}, {}
    for name, cls in impls.items():
        mod = cls(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                  attention_type="self").to(dev)
        kk, vv = k, v  # both expand query groups themselves
        best = float("inf")
        for i in range(args.iters + 1):
            qi, ki, vi = (t.clone().requires_grad_() for t in (q, kk, vv))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = mod(qi, ki, vi, None, attn_mask_type=AttnMaskType.causal)
            out.float().pow(2).mean().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:  # first call warms up
                best = min(best, time.perf_counter() - t0)
        times[name], outs[name] = best, out.detach().float()
    a, b_ = outs.values()
    diff = (a - b_).abs().max().item()
    print(f"device={dev} seq={s} batch={b} heads={h} groups={n} head_dim={d}")
    for name, t in times.items():
        print(f"  {name:40s} {t * 1e3:9.1f} ms  (fwd+bwd, best of {args.iters})")
    base, ours = times.values()
    print(f"  speed-up SDPAttention / local: {base / ours:.2f}x   max |out diff| = {diff:.2e}")
    if diff > 1e-3:
        raise SystemExit("outputs differ: the comparison is invalid")
    parallel.destroy()


if __name__ == "__main__":
    main()
