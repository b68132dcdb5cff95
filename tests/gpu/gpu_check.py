#!/usr/bin/env python3
"""One-shot GPU check of the cuda backend (under 10 minutes on one H100/H200).

Without CUDA it prints one line and exits 0 (CI runs it so). With CUDA it runs, each step in
its own process, and prints one JSON summary (also written to OUT/gpu_check.json):

  environment   torch, CUDA, GPU, megatron-core, transformers, torchao; TE/flash-attn/apex
  peak          bf16 matmul TFLOP/s (8192^3), measured here: the MFU denominator
  prepare       a Llama-3-8B-shaped model with 4 layers (1.9 B parameters, random bf16
                weights), written as HF safetensors and converted to a Megatron checkpoint by
                the converter (megatron_patch.conversion.cli); a random-token indexed dataset
  parity        logits and every layer's output of that checkpoint, loaded by the trainer's
                loader into the cuda backend's model, vs transformers (SDPA), both bf16
  train_bf16    the REAL 25-argument launcher (examples/llama3/run_mcore_llama3.sh, MP_NPROC=1):
                bf16, SEQ_LEN 4096, FL=true, MBS 1, GBS 8, 10 iterations; tokens/s from its
                iteration lines (median after 3 warm-up iterations), TFLOP/s from it with the
                trainer's FLOP formula (training/train_log.py), MFU against the peak
  hf_sdpa       the same model and batch in transformers + SDPA, the way HF's Trainer runs
                bf16 (fp32 weights, torch.autocast bf16, fused AdamW): the baseline
  train_fp8     the launcher with PR=fp8 when Transformer Engine or torchao can run here
  + peak device memory of every step (nvidia-smi, sampled), speedup_vs_hf, and the goals
  (>= 1.15x transformers' tokens/s, >= 60 % MFU) -- reported, not enforced.
Exit status: 0 when every step ran and parity passed, 1 otherwise (the JSON says which).

How to run it on the lent GPU machine (Python 3.12 image with torch 2.11+cu130, transformers,
safetensors, tokenizers, sentencepiece, einops, numpy, pyarrow, tqdm, tensorboard; no
megatron-core, torchao, Transformer Engine, flash-attn or apex):

1. here, in the repository root (pip needs the registry; 6 MB of wheels):
     echo /.whl/ >> .git/info/exclude
     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
         --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
         megatron-core==0.16.1 torchao==0.18.0
2. the device tool's run, carry [".whl"], timeout_s 600:
     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
         --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
     python3 tests/gpu/gpu_check.py --out $OUT
   OUT receives gpu_check.json, steps.log (every step's output) and the launcher logs.
   Scratch space: ~40 GB (the launcher's final checkpoint of the 1.9 B model with its Adam
   state is ~27 GB, deleted after each run); by default /dev/shm when it has room, else the
   temporary directory (--work DIR chooses).

``--cpu-rehearsal`` runs the same steps on the CPU with a tiny model (what
tests/test_gpu_check.py does), so the script itself is exercised without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(ROOT, "examples", "llama3", "run_mcore_llama3.sh")
RESULT = "GPU_CHECK_RESULT "
BUDGET_S = 540          # the whole check (the device tool allows 600 s a command, wheels included)
GOAL_SPEEDUP, GOAL_MFU = 1.15, 0.60


class Shape:
    """What the check trains: 8B shapes on a GPU, a tiny model for the CPU rehearsal."""

    def __init__(self, rehearsal: bool):
        self.rehearsal = rehearsal
        self.layers = 2 if rehearsal else 4
        self.seq = 128 if rehearsal else 4096
        self.mbs, self.gbs = 1, 2 if rehearsal else 8
        self.iters, self.warmup_iters = (5, 2) if rehearsal else (10, 3)
        self.matmul = 256 if rehearsal else 8192
        self.parity_tokens = 128 if rehearsal else 2048

    def arch(self):
        import dataclasses

        from megatron_patch.models.llama import get_preset
        if self.rehearsal:  # small vocabulary: the CPU spends its time on the steps' logic
            return dataclasses.replace(get_preset("llama3", "tiny"), num_layers=self.layers,
                                       vocab_size=512)
        return dataclasses.replace(get_preset("llama3", "8B"), num_layers=self.layers)


# ---- small helpers ---------------------------------------------------------------------------
def _device(rehearsal: bool) -> str:
    return "cpu" if rehearsal else "cuda"


def _sync(dev: str) -> None:
    import torch
    if dev == "cuda":
        torch.cuda.synchronize()


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def _emit(result: dict) -> None:
    print(RESULT + json.dumps(result), flush=True)


def _single_process_env() -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from megatron_patch.parallel import free_port
        os.environ["MASTER_PORT"] = str(free_port())


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for dist in ("torch", "megatron-core", "transformers", "torchao", "transformer-engine",
                 "transformer_engine", "flash-attn", "flash_attn", "apex", "safetensors"):
        try:
            out[dist.replace("_", "-")] = version(dist)
        except PackageNotFoundError:
            out.setdefault(dist.replace("_", "-"), None)
    return out


# ---- steps (each runs in its own process) ----------------------------------------------------
def step_environment(shape: Shape, work: str) -> dict:
    import importlib.util

    import torch
    env = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda, "packages": _versions()}
    for mod in ("transformer_engine", "flash_attn", "apex", "torchao", "megatron.core"):
        try:
            env[f"{mod}_importable"] = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            env[f"{mod}_importable"] = False
    if not shape.rehearsal:
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
    if env["megatron.core_importable"]:
        import megatron_patch
        from megatron_patch.backends.cuda import te_available
        env["backend"] = megatron_patch.backend.name
        env["transformer_engine_usable"] = te_available()
    return env


def step_peak(shape: Shape, work: str) -> dict:
    import torch
    dev, n = _device(shape.rehearsal), shape.matmul
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(dev)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(dev)
    dt = time.perf_counter() - t0
    return {"bf16_matmul_tflops": 2 * n ** 3 * reps / dt / 1e12, "size": n, "reps": reps}


def step_prepare(shape: Shape, work: str) -> dict:
    import numpy as np
    import torch

    from megatron_patch.conversion.synthetic import write_hf_checkpoint
    from megatron_patch.data.indexed_writer import IndexedWriter
    from megatron_patch.models.llama import mapping
    arch = shape.arch()
    dev = _device(shape.rehearsal)
    g = torch.Generator(device=dev).manual_seed(0)
    state = {}
    for name, shp in mapping.hf_tensor_plan(arch):  # transformers-like init, made on the device
        t = torch.randn(shp, generator=g, device=dev, dtype=torch.float32)
        t = 1.0 + 0.1 * t if name.endswith("norm.weight") else arch.initializer_range * t
        state[name] = t.to(torch.bfloat16).cpu()
    hf_dir, ckpt = os.path.join(work, "hf"), os.path.join(work, "ckpt")
    write_hf_checkpoint(hf_dir, arch, state, dtype=torch.bfloat16)
    n_params = sum(t.numel() for t in state.values())
    del state
    t0 = time.time()
    conv = subprocess.run([sys.executable, "-m", "megatron_patch.conversion.cli", "auto", hf_dir,
                           ckpt, "1", "1", "false", "false", "false", "bf16"],
                          capture_output=True, text=True, env=_child_env(shape))
    print(conv.stdout + conv.stderr, flush=True)
    if conv.returncode != 0:
        raise RuntimeError(f"converter exited {conv.returncode}")
    # random tokens: enough documents for the iterations (GPTDataset splits 99/1)
    docs = 200  # GPTDataset concatenates documents; 1 % of them (2) form the validation split
    doc = max(64, -(-(shape.iters + 2) * shape.gbs * (shape.seq + 1) * 2 // docs))
    ids = np.random.default_rng(0).integers(0, arch.vocab_size, docs * doc, dtype=np.int64)
    prefix = os.path.join(work, "data", "random_text_document")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    w = IndexedWriter(prefix, np.int32)
    w.add_documents(ids, [doc] * docs)
    w.finish()
    w.commit()
    from megatron_patch.training.train_log import model_flops_per_token
    return {"model": f"Llama-3-8B shapes, {arch.num_layers} layers" if not shape.rehearsal
            else f"llama3 tiny, {arch.num_layers} layers", "parameters": n_params,
            "flops_per_token": model_flops_per_token(arch, shape.seq),
            "hf_dir": hf_dir, "checkpoint": ckpt, "data": prefix, "tokens": int(ids.size),
            "convert_s": round(time.time() - t0, 1)}


def step_parity(shape: Shape, work: str) -> dict:
    """The converted checkpoint through the trainer's loader into the cuda backend's model
    vs transformers, bf16, per layer (the converter's CHECK table and tolerances)."""
    import torch
    from transformers import LlamaForCausalLM

    _single_process_env()
    from megatron_patch import parallel
    from megatron_patch.backends import active_backend
    from megatron_patch.checkpoint import load_model_shards
    from megatron_patch.conversion.check import capture_hf, capture_mcore, compare, tolerance
    from megatron_patch.models.llama import LlamaArch
    from megatron_patch.models.llama.config import ParallelSettings, transformer_config
    from megatron_patch.models.llama.provider import build_llama
    hf_dir, ckpt = os.path.join(work, "hf"), os.path.join(work, "ckpt")
    parallel.init_distributed()
    parallel.initialize_model_parallel(tp=1, pp=1)
    backend = active_backend()
    arch = LlamaArch.from_hf_config(hf_dir)
    config = transformer_config(arch, ParallelSettings(), "bf16",
                                **backend.training_overrides(True, "bf16"))
    model = build_llama(arch, config).to(backend.device(0)).eval()
    load_model_shards(ckpt, [model], arch=arch)
    attn = type(model.decoder.layers[0].self_attention.core_attention).__name__
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16,
                                          attn_implementation="sdpa").to(backend.device(0)).eval()
    ids = torch.randint(0, arch.vocab_size, (1, shape.parity_tokens),
                        generator=torch.Generator().manual_seed(1)).to(backend.device(0))
    ref = capture_hf(hf, ids, arch.vocab_size)
    got = dict(capture_mcore(model, ids, arch.vocab_size))
    tol = tolerance("bf16", arch)
    rows, ok = [], True
    for point, r in ref:
        max_abs, rel, cos = compare(r, got[point])
        passed = rel <= tol.rtol and cos >= tol.min_cos
        ok &= passed
        rows.append({"point": point, "max_abs": max_abs, "rel": rel, "cos": cos, "ok": passed})
    top1 = (ref[-1][1].argmax(-1) == got["logits"].argmax(-1)).float().mean().item()
    parallel.destroy()
    return {"passed": ok, "tolerance": {"rel": tol.rtol, "cos": tol.min_cos},
            "tokens": shape.parity_tokens, "core_attention": attn, "backend": backend.name,
            "top1_agreement": top1, "rows": rows}


def step_hf_sdpa(shape: Shape, work: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from megatron_patch.models.llama import LlamaArch
    from megatron_patch.training.train_log import model_flops_per_token
    dev = _device(shape.rehearsal)
    hf_dir = os.path.join(work, "hf")
    arch = LlamaArch.from_hf_config(hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                             attn_implementation="sdpa").to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, betas=(0.9, 0.95),
                            fused=dev == "cuda")
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, arch.vocab_size, (shape.mbs, shape.seq), generator=g).to(dev)
               for _ in range(shape.gbs // shape.mbs)]
    times = []
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(shape.iters):
        _sync(dev)
        t0 = time.perf_counter()
        for ids in batches:
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / len(batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[shape.warmup_iters:])
    tokens = shape.gbs * shape.seq
    flops = model_flops_per_token(arch, shape.seq) * tokens
    return {"mode": "transformers LlamaForCausalLM, SDPA, fp32 weights + torch.autocast(bf16), "
                    "fused AdamW, clip 1.0", "attn_implementation": model.config._attn_implementation,
            "tokens_per_s": tokens / dt, "tflops": flops / dt / 1e12,
            "iteration_s": times, "final_loss": float(loss.item() * len(batches)),
            "torch_peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                                      if dev == "cuda" else None)}


STEPS = {"environment": step_environment, "peak": step_peak, "prepare": step_prepare,
         "parity": step_parity, "hf_sdpa": step_hf_sdpa}


# ---- the launcher ----------------------------------------------------------------------------
_ITER = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?elapsed time per iteration \(ms\): ([\d.]+).*?"
                   r"lm loss: ([^ |]+).*?tokens per second per device: ([\d.]+) \| "
                   r"throughput per device \(TFLOP/s\): ([\d.]+)")


def parse_iterations(log: str) -> list:
    return [{"iteration": int(m[0]), "ms": float(m[1]), "loss": float(m[2]),
             "tokens_per_s": float(m[3]), "tflops": float(m[4])} for m in _ITER.findall(log)]


def train_run(shape: Shape, work: str, pr: str, log_path: str, timeout: float,
              flops_per_token: float) -> dict:
    prep = os.path.join(work, "data", "random_text_document")
    out = os.path.join(work, f"train_{pr}")
    tokens = shape.gbs * shape.seq
    args = ["dsw", "auto", shape.mbs, shape.gbs, "1e-5", "1e-6", shape.seq, shape.seq, pr,
            1, 1, 1, "false", "false", "true", "false", "false", "false", 100000, prep, prep,
            os.path.join(work, "ckpt"), shape.iters * tokens, tokens, out]
    env = _child_env(shape, MP_NPROC="1", MP_EVAL_ITERS="0", MP_PYTHON=sys.executable)
    cmd = ["sh", LAUNCHER] + [str(a) for a in args]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=work)
    log = p.stdout + p.stderr
    with open(log_path, "w") as f:
        f.write(log)
    shutil.rmtree(out, ignore_errors=True)  # the final checkpoint (with Adam state) is big
    its = parse_iterations(log)
    res = {"command": "sh examples/llama3/run_mcore_llama3.sh " + " ".join(map(str, args)),
           "returncode": p.returncode, "wall_s": round(time.time() - t0, 1),
           "iterations": len(its), "losses": [i["loss"] for i in its]}
    if p.returncode != 0 or len(its) != shape.iters:
        res["error_tail"] = log.splitlines()[-40:]
        return res
    steady = its[shape.warmup_iters:]
    tps = statistics.median(i["tokens_per_s"] for i in steady)
    # TFLOP/s from tokens/s and the trainer's own FLOP formula (train_log.model_flops_per_token,
    # which the hf_sdpa step uses too); the log's value is rounded to 3 decimals
    res.update(tokens_per_s=tps, tflops=tps * flops_per_token / 1e12,
               tflops_logged=statistics.median(i["tflops"] for i in steady),
               iteration_ms=[i["ms"] for i in its])
    fp8_line = [line for line in log.splitlines() if "fp8 via" in line]
    res["fp8_path"] = fp8_line[0].strip("> ") if fp8_line else None
    return res


# ---- orchestration ---------------------------------------------------------------------------
def _child_env(shape: Shape, **extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MEGATRON_PATCH_BACKEND"] = "cpu" if shape.rehearsal else "cuda"
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


class MemorySampler:
    """Peak GPU memory in use (nvidia-smi, every 0.5 s) while a step runs: device-level,
    CUDA context and allocator cache included, the same measure for every step."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.peak_mib = None
        self._stop = threading.Event()
        self._thread = None

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                                      "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = float(out.strip().splitlines()[0])
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            except Exception:
                pass
            self._stop.wait(0.5)

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    @property
    def peak_gib(self):
        return None if self.peak_mib is None else round(self.peak_mib / 1024, 2)


class Check:
    def __init__(self, shape: Shape, work: str, out: str):
        self.shape, self.work, self.out = shape, work, out
        self.t0 = time.time()
        self.summary = {"ok": False, "failures": [], "rehearsal": shape.rehearsal, "steps_s": {}}
        self.steps_log = open(os.path.join(out, "steps.log"), "w")

    def left(self) -> float:
        return BUDGET_S - (time.time() - self.t0)

    def fail(self, what: str) -> None:
        self.summary["failures"].append(what)

    def step(self, name: str, timeout: float):
        """Run one step in a child process; its result dict, or None (recorded as failure)."""
        if self.left() < 20:
            self.fail(f"{name}: not started, the {BUDGET_S} s budget is spent")
            return None
        cmd = [sys.executable, os.path.abspath(__file__), "--step", name, "--work", self.work]
        if self.shape.rehearsal:
            cmd.append("--cpu-rehearsal")
        t0 = time.time()
        with MemorySampler(not self.shape.rehearsal) as mem:
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(self.shape),
                                   timeout=min(timeout, self.left()))
                output, rc = p.stdout + p.stderr, p.returncode
            except subprocess.TimeoutExpired as e:
                output, rc = _text(e.stdout) + _text(e.stderr), "timeout"
        self.summary["steps_s"][name] = round(time.time() - t0, 1)
        self.steps_log.write(f"===== {name} (exit {rc}) =====\n{output}\n")
        self.steps_log.flush()
        lines = [l for l in output.splitlines() if l.startswith(RESULT)]
        if rc != 0 or not lines:
            self.fail(f"{name}: exit {rc}: " + " | ".join(output.strip().splitlines()[-3:]))
            return None
        result = json.loads(lines[-1][len(RESULT):])
        if mem.peak_gib is not None:
            result["peak_device_memory_gib"] = mem.peak_gib
        return result

    def train(self, pr: str, timeout: float):
        if self.left() < 60:
            self.fail(f"train_{pr}: not started, the {BUDGET_S} s budget is spent")
            return None
        log_path = os.path.join(self.out, f"train_{pr}.log")
        t0 = time.time()
        with MemorySampler(not self.shape.rehearsal) as mem:
            try:
                res = train_run(self.shape, self.work, pr, log_path, min(timeout, self.left()),
                                self.summary["prepare"]["flops_per_token"])
            except subprocess.TimeoutExpired:
                self.fail(f"train_{pr}: timed out")
                return None
        self.summary["steps_s"][f"train_{pr}"] = round(time.time() - t0, 1)
        res["peak_device_memory_gib"] = mem.peak_gib
        if "error_tail" in res:
            self.fail(f"train_{pr}: launcher exit {res['returncode']}, {res['iterations']} "
                      f"iterations logged (see train_{pr}.log)")
        return res

    def run(self) -> dict:
        s = self.summary
        s["environment"] = self.step("environment", 120)
        if s["environment"] and not s["environment"].get("megatron.core_importable"):
            self.fail("megatron-core is not importable: install the wheels named at the top of "
                      "tests/gpu/gpu_check.py")
            return self.finish()
        peak = self.step("peak", 60)
        s["matmul_peak_bf16_tflops"] = peak and round(peak["bf16_matmul_tflops"], 4)
        s["prepare"] = self.step("prepare", 240)
        if not s["prepare"]:
            return self.finish()
        s["parity"] = self.step("parity", 180)
        if s["parity"] and not s["parity"]["passed"]:
            self.fail("parity: megatron_patch's logits differ from transformers' beyond the "
                      "bf16 tolerance")
        s["train_bf16"] = self.train("bf16", 300)
        s["hf_sdpa"] = self.step("hf_sdpa", 180)
        s["train_fp8"] = self.fp8()
        return self.finish()

    def fp8(self):
        env = self.summary.get("environment") or {}
        if not (env.get("transformer_engine_usable") or env.get("torchao_importable")):
            return {"skipped": "neither Transformer Engine nor torchao is importable"}
        cap = env.get("capability")
        if cap and not env.get("transformer_engine_usable") and \
                tuple(int(x) for x in cap.split(".")) < (8, 9):
            return {"skipped": f"compute capability {cap} < 8.9: no float8 tensor cores"}
        return self.train("fp8", 300)

    def finish(self) -> dict:
        s = self.summary
        peak = s.get("matmul_peak_bf16_tflops")
        for key in ("train_bf16", "hf_sdpa", "train_fp8"):
            r = s.get(key)
            if r and r.get("tflops") is not None and peak:
                r["mfu"] = round(r["tflops"] / peak, 4)
        bf, hf, f8 = s.get("train_bf16") or {}, s.get("hf_sdpa") or {}, s.get("train_fp8") or {}
        if bf.get("tokens_per_s") and hf.get("tokens_per_s"):
            s["speedup_vs_hf"] = round(bf["tokens_per_s"] / hf["tokens_per_s"], 3)
            s["goals"] = {f"tokens/s >= {GOAL_SPEEDUP}x transformers+SDPA":
                          s["speedup_vs_hf"] >= GOAL_SPEEDUP,
                          f"MFU >= {GOAL_MFU:.0%} of measured bf16 matmul peak":
                          bf.get("mfu", 0) >= GOAL_MFU}
        if bf.get("tokens_per_s") and f8.get("tokens_per_s"):
            f8["speedup_vs_bf16"] = round(f8["tokens_per_s"] / bf["tokens_per_s"], 3)
        s["total_s"] = round(time.time() - self.t0, 1)
        s["ok"] = not s["failures"]
        self.steps_log.close()
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump(s, f, indent=2)
        return s


def _default_work(rehearsal: bool) -> str:
    """A scratch directory with room for the run: /dev/shm (memory, fast checkpoint writes)
    when it has ~40 GB free, else the temporary directory with the most room."""
    if rehearsal:
        return tempfile.mkdtemp(prefix="gpu_check_")
    need = 40 * 2**30
    places = [p for p in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(p)]
    free = {p: shutil.disk_usage(p).free for p in places}
    roomy = [p for p in places if free[p] >= need]
    base = roomy[0] if roomy else max(places, key=free.get)
    return tempfile.mkdtemp(prefix="gpu_check_", dir=base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="where gpu_check.json and the logs go "
                    "(default: the work directory)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a new one in "
                    "/dev/shm or the temporary directory, removed at the end; ~40 GB on a GPU)")
    ap.add_argument("--cpu-rehearsal", action="store_true",
                    help="run every step on the CPU with a tiny model (tests the script)")
    ap.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    shape = Shape(ns.cpu_rehearsal)

    if ns.step:  # a child: one step, its result on the last line
        sys.path.insert(0, ROOT)
        _emit(STEPS[ns.step](shape, ns.work))
        return 0

    try:
        import torch
        has_cuda = torch.cuda.is_available()
        why = f"torch {torch.__version__}, CUDA build {torch.version.cuda}"
    except ImportError as exc:
        has_cuda, why = False, f"torch does not import: {exc}"
    if not has_cuda and not ns.cpu_rehearsal:
        print(f"gpu_check: skipped: no CUDA device ({why})")
        return 0

    work = ns.work or _default_work(ns.cpu_rehearsal)
    os.makedirs(work, exist_ok=True)
    out = ns.out or work
    os.makedirs(out, exist_ok=True)
    try:
        summary = Check(shape, work, out).run()
    finally:
        if ns.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
