"""Context parallelism: peak RSS per rank and step time, CP=1 (one process) vs CP=2 (two
processes sharing each sequence), for long sequences on a tiny-width Llama.

Each configuration runs in freshly spawned processes (gloo), so a process's ru_maxrss is
that configuration's peak: the interpreter, torch and megatron-core, the model, and the
training steps. "step" is the peak minus the RSS just before the first step (what the
step itself needs). A step is forward + backward (megatron-core's schedule, per-token loss,
gradient reduction) + the Adam update; time is the median of the timed steps on the
slowest rank. Prints both layouts and the CP=2 / CP=1 ratios, and the core attention's
work per rank alone (one thread, no communication): CP=1's vs one CP=2 rank's.

    python benchmarks/cp_memory.py [--seqs 8192 16384] [--steps 2] [--layers 4]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.multiprocessing as mp


def _arch(layers: int, seq: int):
    from megatron_patch.models.llama import LlamaArch
    return LlamaArch(hidden_size=64, num_layers=layers, num_attention_heads=4,
                     num_key_value_heads=2, ffn_hidden_size=128, vocab_size=512,
                     max_position_embeddings=seq, rope_theta=10000.0, norm_eps=1e-5,
                     generation="llama2")


def _worker(rank, world, port, seq, layers, steps, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore")
    import megatron_patch  # noqa: F401  (selects the backend)
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch import parallel
    from megatron_patch.models.llama.config import ParallelSettings, transformer_config
    from megatron_patch.training.forward_step import forward_step
    from megatron_patch.training.model_setup import build_model_chunks, build_optimizer

    parallel.init_distributed()
    parallel.initialize_model_parallel(cp=world)
    arch = _arch(layers, seq)
    cfg = transformer_config(arch, ParallelSettings(cp=world), "fp32",
                             calculate_per_token_loss=True)
    chunks = build_model_chunks(arch, cfg)
    opt = build_optimizer(chunks, cfg, lr=1e-4)
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.grad_scale_func = opt.scale_loss
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (1, seq + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(1, seq), "position_ids": torch.arange(seq)[None]}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, lazy init)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        for c in chunks:
            c.zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=chunks,
            num_microbatches=1, seq_length=seq, micro_batch_size=1, forward_only=False)
        opt.step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((rank, peak, before, statistics.median(times[1:])))
    parallel.destroy()


def measure(seq: int, cp: int, layers: int, steps: int) -> dict:
    from megatron_patch.parallel import free_port
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, cp, port, seq, layers, steps, queue))
             for r in range(cp)]
    for p in procs:
        p.start()
    rows = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    return {"peak": max(r[1] for r in rows), "step_mem": max(r[1] - r[2] for r in rows),
            "time": max(r[3] for r in rows)}


def attention_seconds(seq: int, repeat: int = 3) -> tuple:
    """Forward + backward of the core attention alone, one thread, best of ``repeat``:
    CP=1's causal SDPA over ``seq`` tokens vs what one CP=2 rank computes (its two chunks,
    each against its key prefix). Free of the communication and of other processes."""
    import torch.nn.functional as F

    from megatron_patch.transformer.cp_attention import prefix_causal_attention
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    h, kv, d, c = 4, 2, 16, seq // 4
    q, k, v = (torch.randn(1, n, seq, d, generator=g) for n in (h, kv, kv))

    def best(fn):
        times = []
        for _ in range(repeat):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            t0 = time.perf_counter()
            fn(qq, kk, vv).sum().backward()
            times.append(time.perf_counter() - t0)
        return min(times)

    full = best(lambda q_, k_, v_: F.scaled_dot_product_attention(
        q_, k_, v_, is_causal=True, enable_gqa=True))
    # rank 0 holds chunks 0 and 3: queries [0, c) see keys [0, c), [3c, 4c) see [0, 4c)
    rank0 = best(lambda q_, k_, v_: torch.cat([
        prefix_causal_attention(q_[:, :, :c], k_[:, :, :c], v_[:, :, :c], 0, d ** -0.5),
        prefix_causal_attention(q_[:, :, 3 * c:], k_, v_, 3 * c, d ** -0.5)], dim=2))
    return full, rank0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("MEGATRON_PATCH_BACKEND", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mib = 2 ** 20
    print(f"tiny-width Llama: hidden 64, {args.layers} layers, 4 heads / 2 KV heads, vocab "
          f"512, fp32, micro-batch 1; {args.steps} timed steps after one warm-up")
    for seq in args.seqs:
        one, two = (measure(seq, cp, args.layers, args.steps) for cp in (1, 2))
        for name, m in (("CP=1 (1 process) ", one), ("CP=2 (2 processes)", two)):
            print(f"seq {seq:6d} {name}: peak RSS per rank {m['peak'] / mib:7.1f} MiB "
                  f"(step {m['step_mem'] / mib:7.1f} MiB), step {m['time']:6.2f} s", flush=True)
        print(f"seq {seq:6d} CP=2 / CP=1: peak RSS {two['peak'] / one['peak']:.2f}x, step "
              f"memory {two['step_mem'] / one['step_mem']:.2f}x, step time "
              f"{two['time'] / one['time']:.2f}x", flush=True)
        full, rank0 = attention_seconds(seq)
        print(f"seq {seq:6d} core attention fwd+bwd, one thread: CP=1 {full:.2f} s, one CP=2 "
              f"rank {rank0:.2f} s ({rank0 / full:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
