#!/usr/bin/env python3
"""Peak device memory with and without each memory switch, on one GPU (under 6 minutes on
one H100/H200). Without CUDA it prints one line and exits 0.

A Llama-3-8B-shaped model with 4 layers (hidden 4096, 32 heads / 8 KV groups, FFN 14336,
vocabulary 128256: 1.9 B parameters), bf16, random weights, one process; every case runs
the trainer's own setup (training/setup.py: offload wiring, optimizer) and train_step for
3 iterations in a fresh process, and reports torch.cuda.max_memory_allocated over the
iterations, the median step time and the first loss (the same weights and batches in
every case, so first losses must agree):

  baseline            DO=true, SEQ_LEN 4096, BATCH_SIZE 1, GLOBAL_BATCH_SIZE 2
  ac_offload          + AC=offload, MP_AC_LAYERS=3 (Transformer Engine's offload when TE
                      imports, else the torch saved-tensor hooks with pinned buffers)
  optimizer_static    + OPTIMIZER_OFFLOAD=static (fraction 1.0: Adam on the host)
  optimizer_auto      + OPTIMIZER_OFFLOAD=auto (the planned fraction is printed)
  sft_dense_mask      SFT rows of PAD_LEN 8192 packed with samples of 300-3000 tokens,
                      attention under the dense [b, 1, s, s] block-diagonal mask (before)
  sft_packed_thd      the same rows as THD PackedSeqParams (MP_SFT_PACKING=true now)

Prints one JSON summary (also OUT/memory_switches.json) with each case, each switch's peak
relative to its baseline, and exit status 0 when every case ran and the first losses agree.

How to run it on the lent GPU machine (megatron-core is not installed there; see the header
of tests/gpu/gpu_check.py for fetching the wheels into .whl once):
  the device tool's run, carry [".whl"], timeout_s 600:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \\
    python3 tests/gpu/memory_switches_check.py --out $OUT

``--cpu-rehearsal`` runs every case on the CPU with a tiny model (tests/test_gpu_check.py),
so the script is exercised without a GPU; its memory numbers mean nothing there.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULT = "MEMORY_CASE_RESULT "
GiB = 2.0 ** 30

CASES = {  # name: (launcher arguments that differ from the baseline, env knobs, dense mask)
    "baseline": ({}, {}, False),
    "ac_offload": ({"AC": "offload"}, {"MP_AC_LAYERS": "3"}, False),
    "optimizer_static": ({"OPTIMIZER_OFFLOAD": "static"}, {}, False),
    "optimizer_auto": ({"OPTIMIZER_OFFLOAD": "auto"}, {}, False),
    "sft_dense_mask": ({"SFT": "true"}, {"MP_SFT_PACKING": "true"}, True),
    "sft_packed_thd": ({"SFT": "true"}, {"MP_SFT_PACKING": "true"}, False),
}
RELATIVE = {"ac_offload": "baseline", "optimizer_static": "baseline",
            "optimizer_auto": "baseline", "sft_packed_thd": "sft_dense_mask"}


class Shape:
    def __init__(self, rehearsal: bool):
        self.rehearsal = rehearsal
        self.seq, self.sft_seq = (128, 256) if rehearsal else (4096, 8192)
        self.sample_len = (20, 90) if rehearsal else (300, 3000)
        self.mbs, self.gbs, self.iters = 1, 2, 3

    def arch(self):
        import dataclasses

        from megatron_patch.models.llama import get_preset
        if self.rehearsal:
            return dataclasses.replace(get_preset("llama3", "tiny"), num_layers=4,
                                       vocab_size=512)
        return dataclasses.replace(get_preset("llama3", "8B"), num_layers=4)


def _config(shape: Shape, name: str, out: str):
    from megatron_patch.training.arguments import ARG_NAMES, build_config
    changes, env, _ = CASES[name]
    sft = changes.get("SFT") == "true"
    seq = shape.sft_seq if sft else shape.seq
    a = dict(ENV="dsw", MODEL_SIZE="8B", BATCH_SIZE=shape.mbs, GLOBAL_BATCH_SIZE=shape.gbs,
             LR="1e-5", MIN_LR="1e-6", SEQ_LEN=seq, PAD_LEN=seq, PR="bf16", TP=1, PP=1, CP=1,
             SP="false", DO="true", FL="true", SFT="false", AC="false",
             OPTIMIZER_OFFLOAD="false", SAVE_INTERVAL=100000, DATASET_PATH="unused",
             VALID_DATASET_PATH="none", PRETRAIN_CHECKPOINT_PATH="none",
             TRAIN_TOKENS_OR_ITERS=shape.iters if sft else shape.iters * shape.gbs * seq,
             WARMUP_TOKENS_OR_ITERS=0, OUTPUT_BASEPATH=out)
    a.update(changes)
    cfg = build_config([str(a[n]) for n in ARG_NAMES], "llama3", env=env, check_paths=False)
    return cfg.replace(eval_iters=0)


def _batches(shape: Shape, cfg, arch):
    """The same random micro-batches in every case (seeded): pretraining rows, or packed
    SFT rows in the trainer's own collated form."""
    import torch

    from megatron_patch.data.sft_dataset import pack_boundaries
    from megatron_patch.training.batches import collate
    g = torch.Generator().manual_seed(1)
    seq, out = cfg.data.sample_len, []
    for _ in range(shape.iters * shape.gbs // shape.mbs):
        rows = []
        for _ in range(shape.mbs):
            tokens = torch.randint(0, arch.vocab_size, (seq + 1,), generator=g)
            row = {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(seq),
                   "position_ids": torch.arange(seq)}
            if cfg.data.sft:
                lens, used = [], 0
                while used < seq:
                    lens.append(int(torch.randint(*shape.sample_len, (1,), generator=g)))
                    used += lens[-1]
                row.update(pack_boundaries(lens, seq))
            rows.append(row)
        out.append(collate(rows))
    return out


def _dense_forward_step(data_iterator, model):
    """The dense block-diagonal mask MP_SFT_PACKING used before THD (the baseline)."""
    from functools import partial

    import torch

    from megatron_patch.training.forward_step import masked_lm_loss
    batch = dict(next(data_iterator))
    cu = batch.pop("cu_seqlens").long()
    batch.pop("max_seqlen")
    dev = next(model.parameters()).device
    b, s = batch["tokens"].shape
    seg = (torch.searchsorted(cu, torch.arange(b * s), right=True) - 1).view(b, s).to(dev)
    keep = (seg[:, :, None] == seg[:, None, :]) & torch.ones(s, s, dtype=torch.bool,
                                                             device=dev).tril()
    batch = {k: v.to(dev) for k, v in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], ~keep[:, None],
                   labels=batch["labels"])
    return output, partial(masked_lm_loss, batch["loss_mask"])


def run_case(shape: Shape, name: str, work: str) -> dict:
    """One case in this process."""
    import torch

    import megatron_patch  # noqa: F401
    from megatron_patch import parallel
    from megatron_patch.backends import active_backend
    from megatron_patch.training import forward_step as fs
    from megatron_patch.training import loop
    from megatron_patch.training import setup as setup_mod
    arch = shape.arch()
    cfg = _config(shape, name, os.path.join(work, name))
    setup_mod.model_arch = lambda _cfg: arch  # the 4-layer model instead of the 32-layer preset
    if CASES[name][2]:
        fs.forward_step = _dense_forward_step
        loop._schedule_shape = lambda c, seq_len: (seq_len, c.data.micro_batch_size)
    parallel.init_distributed()
    cuda = active_backend().name == "cuda"
    lines = []
    torch.manual_seed(0)
    run = setup_mod.setup(cfg, log=lines.append)
    batches = iter(_batches(shape, cfg, arch))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    losses, times = [], []
    for _ in range(shape.iters):
        t0 = time.perf_counter()
        loss, updated, _, _ = loop.train_step(run, batches, cfg.data.sample_len)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    res = {"case": name, "first_loss": losses[0], "losses": losses,
           "step_s": statistics.median(times[1:]), "log": [l for l in lines if l.startswith(">")]}
    if cuda:
        res.update(peak_gib=round(torch.cuda.max_memory_allocated() / GiB, 3),
                   before_steps_gib=round(before / GiB, 3))
    off = run.activation_offload
    if off is not None:
        res["activation_bytes_offloaded"] = off.packed_bytes
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--cpu-rehearsal", action="store_true")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = Shape(args.cpu_rehearsal)
    if args.case:
        print(RESULT + json.dumps(run_case(shape, args.case, args.out)), flush=True)
        return 0
    if not args.cpu_rehearsal:
        import torch
        if not torch.cuda.is_available():
            print("memory_switches_check: skipped: no CUDA device (use --cpu-rehearsal to "
                  "exercise the script on the CPU)")
            return 0
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               MEGATRON_PATCH_BACKEND="cpu" if shape.rehearsal else "cuda")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    summary = {"rehearsal": shape.rehearsal, "cases": {}, "failures": []}
    for name in CASES:
        t0 = time.time()
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", name,
                            "--out", args.out] + (["--cpu-rehearsal"] if shape.rehearsal else []),
                           capture_output=True, text=True, env=env, timeout=300)
        found = [l for l in p.stdout.splitlines() if l.startswith(RESULT)]
        if p.returncode != 0 or not found:
            summary["failures"].append(f"{name}: exit {p.returncode}")
            summary["cases"][name] = {"error_tail": (p.stdout + p.stderr).splitlines()[-30:]}
            continue
        summary["cases"][name] = dict(json.loads(found[0][len(RESULT):]),
                                      wall_s=round(time.time() - t0, 1))
    cases = summary["cases"]
    for name, ref in RELATIVE.items():
        if "peak_gib" in cases.get(name, {}) and "peak_gib" in cases.get(ref, {}):
            cases[name]["peak_vs_" + ref] = round(cases[name]["peak_gib"] / cases[ref]["peak_gib"], 3)
    for group in (("baseline", "ac_offload", "optimizer_static", "optimizer_auto"),
                  ("sft_dense_mask", "sft_packed_thd")):
        firsts = [cases[n]["first_loss"] for n in group if "first_loss" in cases.get(n, {})]
        if firsts and max(firsts) - min(firsts) > 2e-2:  # bf16: same weights, same batch
            summary["failures"].append(f"first losses differ across {group}: {firsts}")
    summary["ok"] = not summary["failures"]
    text = json.dumps(summary, indent=2)
    with open(os.path.join(args.out, "memory_switches.json"), "w") as f:
        f.write(text)
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
