"""Generation throughput: KV-cached engine vs full recompute vs ``transformers.generate``.

One random Llama (HF ``LlamaForCausalLM``, its weights loaded into megatron-core), the same
prompts for every path, greedy decoding of exactly ``--new-tokens`` tokens per prompt (no
EOS), at each batch size. Prints new tokens per second and the KV engine's ratio to the
other two paths measured in this run. The recompute path decodes one prompt at a time (that
is how it works); transformers decodes the batch left-padded with its own KV cache.

Each measurement is repeated ``--repeat`` times, the paths taking turns, and the best run
counts (other jobs on a shared machine only ever slow a run down). Beside wall-clock
tokens/s it prints tokens per CPU-second of this process, which other processes competing
for the cores disturb less (with one thread the two agree on an idle machine).

    OMP_NUM_THREADS=1 python benchmarks/generate_throughput.py [--batch-sizes 1 8] \
        [--new-tokens 128] [--hidden 512 --layers 8 --heads 8 --kv-heads 4 --ffn 1536]

Also checks that the three paths produce the same tokens for the first prompt (the
benchmark is meaningless otherwise).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def build(a):
    from transformers import LlamaConfig, LlamaForCausalLM

    import megatron_patch  # noqa: F401  (activates the backend)
    from megatron_patch import parallel
    from megatron_patch.inference.loading import model_from_hf_state
    from megatron_patch.inference.runner import ModelRunner
    from megatron_patch.models.llama.arch import LlamaArch

    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, max_position_embeddings=2048,
                      rope_theta=500000.0, initializer_range=0.05, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).float().eval()
    hf.config._attn_implementation = "sdpa"
    hf.generation_config.eos_token_id = None  # decode exactly --new-tokens
    hf.generation_config.pad_token_id = 0
    arch = LlamaArch.from_hf_config(cfg.to_dict())
    parallel.init_distributed()
    parallel.initialize_model_parallel(1, 1)
    runner = ModelRunner(model_from_hf_state(hf.state_dict(), arch), arch)
    return hf, runner


def prompts_for(a, n):
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(a.prompt_len // 2, a.prompt_len + 1, (n,), generator=g).tolist()
    return [torch.randint(3, a.vocab, (k,), generator=g).tolist() for k in lens]


def hf_generate(hf, prompts, new):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                          min_new_tokens=new)
    return [row[width:].tolist() for row in out]


def best_of(repeat, paths):
    """{name: (output, best wall s, best cpu s)}, the paths taking turns ``repeat`` times."""
    res = {}
    for _ in range(repeat):
        for name, fn in paths.items():
            w, c = time.perf_counter(), time.process_time()
            out = fn()
            w, c = time.perf_counter() - w, time.process_time() - c
            _, bw, bc = res.get(name, (None, float("inf"), float("inf")))
            res[name] = (out, min(bw, w), min(bc, c))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=48, help="prompts are len/2..len tokens")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--skip-recompute-above", type=int, default=8,
                   help="measure the (slow) recompute path only up to this batch size")
    p.add_argument("--repeat", type=int, default=3, help="runs per path; the best counts")
    a = p.parse_args(argv)
    if any(b < 1 for b in a.batch_sizes) or a.new_tokens < 1 or a.repeat < 1:
        print("error: --batch-sizes, --new-tokens and --repeat must be >= 1", file=sys.stderr)
        return 2

    from megatron_patch.inference.engine import KVCacheEngine, RecomputeEngine
    from megatron_patch.inference.sampling import SamplingParams

    hf, runner = build(a)
    kv = KVCacheEngine(runner, max_batch_size=max(a.batch_sizes))
    rc = RecomputeEngine(runner)
    sp = SamplingParams(max_new_tokens=a.new_tokens)
    print(f"model: hidden {a.hidden}, {a.layers} layers, {a.heads} heads ({a.kv_heads} kv), "
          f"ffn {a.ffn}, vocab {a.vocab}; prompts {a.prompt_len // 2}..{a.prompt_len} tokens; "
          f"{a.new_tokens} new tokens; torch threads {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    warm = prompts_for(a, 2)  # first calls allocate and build caches: not measured
    kv.generate_batch(warm, SamplingParams(max_new_tokens=4))
    rc.generate(warm[0], SamplingParams(max_new_tokens=4))
    hf_generate(hf, warm, 4)

    print(f"{'batch':>5} {'path':<22} {'tok/s':>9} {'seconds':>8} {'tok/cpu-s':>10}")
    names = {"kv": "kv cache (this engine)", "hf": "transformers.generate",
             "rc": "full recompute"}
    ratios = {}
    for b in a.batch_sizes:
        prompts = prompts_for(a, b)
        total = b * a.new_tokens
        paths = {"kv": lambda: kv.generate_batch(prompts, sp),
                 "hf": lambda: hf_generate(hf, prompts, a.new_tokens)}
        if b <= a.skip_recompute_above:
            paths["rc"] = lambda: rc.generate_batch(prompts, sp)
        res = best_of(a.repeat, paths)
        for name, (out, _, _) in res.items():
            if out[0] != res["kv"][0][0]:
                print(f"error: {names[name]} and the kv engine give different tokens "
                      f"(batch {b})", file=sys.stderr)
                return 1
        for name, (_, w, c) in res.items():
            print(f"{b:>5} {names[name]:<22} {total / w:>9.1f} {w:>8.2f} {total / c:>10.1f}")
        ratios[b] = {name: (w / res["kv"][1], c / res["kv"][2])
                     for name, (_, w, c) in res.items() if name != "kv"}
    print("\nKV engine speed-up, wall (cpu-time); same model, prompts and tokens. Goal on CPU: "
          ">= 5x full recompute, >= 1x transformers.generate")
    for b, r in ratios.items():
        parts = [f"vs {names[n]} {w:.2f}x ({c:.2f}x)" for n, (w, c) in r.items()]
        print(f"  batch {b}: " + ", ".join(parts))
    from megatron_patch import parallel
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
