"""Wall time and peak RSS of HF -> megatron-core conversion (with CHECK too) vs a plain copy.

The same files are copied with ``cp -r`` and converted, on random bf16 HF checkpoints written
to disk shard by shard.

    python benchmarks/convert_memory.py [--sizes 1b,8b] [--layouts 1x1,4x2] [--dir /tmp]
                                        [--mg2hf] [--check] [--check-long] [--keep]

--check adds "hf->mcore TP=1 PP=1 with CHECK=true" (the streamed parity check reads every
tensor back and runs both models layer by layer) on a 128-token prompt (MP_CHECK_LONG=0);
--check-long adds it on the long llama3-rope sequence, the converter's default for
Llama-3.1 (original context + 32 tokens: 8224, ~65x the compute of the short prompt).

Each measured step runs as its own process (``cp -r`` for the copy, the converter CLI for
the conversion); peak RSS is that process's ru_maxrss (os.wait4), wall time includes an
fsync of everything it wrote so neither side is flattered by the page cache holding dirty
data. Converter wall time includes its Python start-up (torch + megatron-core imports).
Everything generated is deleted at the end (unless --keep).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# the parent imports neither torch nor megatron: a forked child's ru_maxrss starts from the
# parent's resident size, so a big parent would inflate every measured peak


def shapes():
    from megatron_patch.models.llama import get_preset
    from megatron_patch.models.llama.arch import LlamaArch
    one_b = LlamaArch(hidden_size=2048, num_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, ffn_hidden_size=8192, vocab_size=128256,
                      max_position_embeddings=131072, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192},
                      tie_word_embeddings=True, generation="llama3_1")  # Llama-3.2-1B shape
    return {"1b": one_b, "8b": get_preset("llama3_1", "8B")}


def generate(arch, path: str, shard_bytes: int = 5 * 10**9) -> int:
    """Random bf16 weights in HF layout, streamed one tensor at a time into the shards."""
    import torch

    from megatron_patch.models.llama import mapping
    from megatron_patch.conversion.hf_files import SafetensorsStreamWriter
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(arch.to_hf_config(), torch_dtype="bfloat16"), f, indent=2)
    plan = mapping.hf_tensor_plan(arch)
    w = SafetensorsStreamWriter(path, plan, torch.bfloat16, shard_bytes)
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 25, generator=g) * 0.02).to(torch.bfloat16)  # 64 MB
    for name, shape in plan:
        n = _numel(shape)
        if n <= pool.numel():  # a view of the pool: no copy
            start = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=g))
            flat = pool[start:start + n]
        else:
            flat = pool.repeat(-(-n // pool.numel()))[:n]
        w.write(name, flat.view(shape))
        del flat
    w.close()
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def measure(cmd: list, out_dir: str, env=None) -> tuple:
    """(wall seconds incl. fsync of out_dir, CPU seconds (user + sys), peak RSS bytes) of
    one child process. CPU time is reported too because wall time on a shared machine
    depends on what else runs."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.decode()[-3000:]}")
    fsync_tree(out_dir)
    return time.perf_counter() - t0, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024


def gib(n):
    return f"{n / 2**30:.2f} GiB"


def _generate_main(size: str, path: str) -> int:
    arch = shapes()[size]
    total = generate(arch, path)
    fsync_tree(path)
    print(json.dumps({"bytes": total}))
    return 0


def _estimate_main(size: str) -> int:
    from megatron_patch.models.llama import mapping
    print(json.dumps({"bytes": 2 * sum(_numel(s) for _, s in mapping.hf_tensor_plan(shapes()[size]))}))
    return 0


def _child(env, *args) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--generate"]:
        return _generate_main(argv[1], argv[2])
    if argv[:1] == ["--estimate"]:
        return _estimate_main(argv[1])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1b,8b")
    ap.add_argument("--layouts", default="1x1", help="TPxPP list, e.g. 1x1,4x2")
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--mg2hf", action="store_true", help="also time the way back (from 1x1)")
    ap.add_argument("--check", action="store_true",
                    help="also hf->mcore TP=1 PP=1 with CHECK on a 128-token prompt")
    ap.add_argument("--check-long", action="store_true",
                    help="also hf->mcore TP=1 PP=1 with CHECK on the long llama3-rope sequence")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    env = dict(os.environ, TQDM_DISABLE="1", MP_OVERWRITE="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for size in args.sizes.split(","):
        nbytes_est = _child(env, "--estimate", size)["bytes"]
        free = shutil.disk_usage(args.dir).free
        if free < 2.3 * nbytes_est:
            print(f"[{size}] skipped: needs ~{gib(2.3 * nbytes_est)} free in {args.dir}, "
                  f"has {gib(free)}")
            continue
        work = os.path.join(args.dir, f"convert_memory_{size}_{os.getpid()}")
        try:
            src = os.path.join(work, "hf")
            t0 = time.perf_counter()
            total = _child(env, "--generate", size, src)["bytes"]
            print(f"[{size}] generated {gib(total)} of bf16 safetensors in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            copy_dir = os.path.join(work, "copy")
            t_copy, c_copy, rss_copy = measure(["cp", "-r", src, copy_dir], copy_dir)
            shutil.rmtree(copy_dir)
            rows.append((size, "plain copy (cp -r)", t_copy, c_copy, rss_copy, 1.0))
            print(f"[{size}] cp -r: {t_copy:.1f} s (cpu {c_copy:.1f} s), peak RSS "
                  f"{gib(rss_copy)}", flush=True)
            checks = ([("128 tokens", "0")] if args.check else []) + \
                ([("long sequence", "1")] if args.check_long else [])
            for label, long in checks:
                dst = os.path.join(work, "mcore_check")
                cmd = [sys.executable, "-m", "megatron_patch.conversion.cli", "auto", src, dst,
                       "1", "1", "false", "true", "false", "bf16"]
                t, c, rss = measure(cmd, dst, dict(env, MP_CHECK_LONG=long))
                step = f"hf->mcore TP=1 PP=1 + CHECK ({label})"
                rows.append((size, step, t, c, rss, t / t_copy))
                print(f"[{size}] {step}: {t:.1f} s ({t / t_copy:.2f}x copy, cpu {c:.1f} s), "
                      f"peak RSS {gib(rss)}", flush=True)
                shutil.rmtree(dst)
            for layout in args.layouts.split(","):
                tp, pp = layout.split("x")
                dst = os.path.join(work, f"mcore_{layout}")
                cmd = [sys.executable, "-m", "megatron_patch.conversion.cli", "auto", src, dst,
                       tp, pp, "false", "false", "false", "bf16"]
                t, c, rss = measure(cmd, dst, env)
                rows.append((size, f"hf->mcore TP={tp} PP={pp}", t, c, rss, t / t_copy))
                print(f"[{size}] hf->mcore TP={tp} PP={pp}: {t:.1f} s ({t / t_copy:.2f}x copy, "
                      f"cpu {c:.1f} s), peak RSS {gib(rss)}", flush=True)
                if args.mg2hf and layout == "1x1":
                    back = os.path.join(work, "hf_back")
                    cmd = [sys.executable, "-m", "megatron_patch.conversion.cli", "auto", dst,
                           back, "1", "1", "true", "false", "false", "bf16"]
                    t, c, rss = measure(cmd, back, env)
                    rows.append((size, "mcore->hf from TP=1 PP=1", t, c, rss, t / t_copy))
                    print(f"[{size}] mcore->hf: {t:.1f} s (cpu {c:.1f} s), peak RSS {gib(rss)}",
                          flush=True)
                    shutil.rmtree(back)
                shutil.rmtree(dst)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| model | step | wall s | x copy | cpu s | peak RSS |\n|---|---|---|---|---|---|")
    for size, step, t, c, rss, ratio in rows:
        print(f"| {size} | {step} | {t:.1f} | {ratio:.2f} | {c:.1f} | {gib(rss)} |")
    return 0


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    sys.exit(main())
