"""Text generation from a megatron-core Llama: greedy or sampled (temperature, top-k, top-p,
repetition / presence / frequency penalties), max new tokens, stop on EOS ids or on a
caller's stop test; plus the command-line plumbing the generate, chat and server CLIs share.

CLI (one prompt, or several with --prompt repeated: they run as one batch):

    python -m megatron_patch.inference.generate --load CKPT --tokenizer TOK_DIR \
        --prompt "The capital of France is" [--max-new-tokens 64] [--temperature 0.7 --top-p 0.9]
    torchrun --nproc_per_node 2 -m megatron_patch.inference.generate --tp 2 ...

``--engine kv`` (default) decodes with megatron-core's KV cache (``engine``); ``--engine
recompute`` runs the reference path (``recompute``), which gives the same greedy tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_patch.cli_args import OneLineErrors

# re-exported: callers use generate.generate / SamplingParams / next_token
from megatron_patch.inference.recompute import generate  # noqa: F401
from megatron_patch.inference.sampling import SamplingParams, next_token  # noqa: F401


def eos_ids_of(tokenizer, generation_config_dir: Optional[str] = None) -> List[int]:
    """EOS ids to stop on, as transformers' generate would: the ``eos_token_id`` (int or
    list) of ``generation_config.json`` when there is one, plus the tokenizer's eos; without
    a generation config, the tokenizer's eos and ``<|eot_id|>`` when the vocabulary has it
    (Llama-3 chat turns end with it)."""
    hf = getattr(tokenizer, "hf", tokenizer)
    ids = [hf.eos_token_id] if hf.eos_token_id is not None else []
    e = None
    if generation_config_dir:
        path = os.path.join(generation_config_dir, "generation_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                e = json.load(f).get("eos_token_id")
    if e is not None:
        ids += e if isinstance(e, list) else [e]
    elif "<|eot_id|>" in hf.get_vocab():
        ids.append(hf.convert_tokens_to_ids("<|eot_id|>"))
    return sorted(set(int(i) for i in ids))


# ---- shared CLI plumbing (generate and chat) ------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, sampling: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--load", required=True, help="Megatron checkpoint directory (any TP/PP)")
    g.add_argument("--tokenizer", default=None,
                   help="HF tokenizer directory (default: --hf-config, then --load)")
    g.add_argument("--hf-config", default=None,
                   help="HF folder / config.json with the architecture (default: the "
                        "checkpoint's args or <load>/config.json)")
    g.add_argument("--model-size", default=None, help="preset instead, e.g. llama3_1-8B")
    g.add_argument("--tp", type=int, default=1)
    g.add_argument("--pp", type=int, default=1)
    g.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32",
                   choices=["fp32", "bf16", "fp16"])
    if sampling:
        s = p.add_argument_group("sampling")
        s.add_argument("--max-new-tokens", type=int, default=256)
        s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        s.add_argument("--top-k", type=int, default=0)
        s.add_argument("--top-p", type=float, default=1.0)
        s.add_argument("--seed", type=int, default=1234)
        s.add_argument("--repetition-penalty", type=float, default=1.0,
                       help="> 1 discourages repeating prompt or generated tokens")
    e = p.add_argument_group("engine")
    e.add_argument("--engine", default="kv", choices=["kv", "recompute"],
                   help="kv: KV-cached batched decoding (default); recompute: the reference "
                        "path, whole sequence every step")
    e.add_argument("--max-batch-size", type=int, default=8,
                   help="prompts decoded together at most (kv engine)")


def sampling_from_args(a) -> SamplingParams:
    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                          top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                          repetition_penalty=a.repetition_penalty)


def engine_from_args(a, runner):
    from megatron_patch.inference.engine import make_engine
    return make_engine(runner, a.engine, a.max_batch_size)


def setup_from_args(a):
    """Init distributed + model parallel, load tokenizer and model.
    -> (runner, tokenizer, tokenizer directory)."""
    import megatron_patch  # noqa: F401  (activates the backend)
    from megatron_patch import parallel
    from megatron_patch.inference.loading import find_checkpoint, load_model, resolve_arch
    from megatron_patch.inference.runner import ModelRunner
    from megatron_patch.tokenizer import load_tokenizer, tokenizer_size

    ckpt = find_checkpoint(a.load)
    arch = resolve_arch(a.load, a.hf_config, a.model_size)
    tok_dir = a.tokenizer or next((d for d in (a.hf_config, a.load, ckpt.root)
                                   if d and os.path.isdir(d) and
                                   os.path.exists(os.path.join(d, "tokenizer_config.json"))),
                                  None)
    if tok_dir is None:
        raise ValueError("no tokenizer next to the checkpoint: pass --tokenizer <HF tokenizer "
                         "directory>")
    n = tokenizer_size(tok_dir) if os.path.isdir(tok_dir) else None
    if n is not None and n > arch.vocab_size:  # its ids would index past the embedding
        raise ValueError(f"--tokenizer {tok_dir}: {n} tokens, but the model's vocabulary holds "
                         f"{arch.vocab_size}: not this model's tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    _, world, _ = parallel.init_distributed()
    if world != a.tp * a.pp:
        raise ValueError(f"{world} processes but TP*PP = {a.tp * a.pp}; launch "
                         f"torchrun --nproc_per_node {a.tp * a.pp}")
    parallel.initialize_model_parallel(a.tp, a.pp)
    model = load_model(a.load, arch, a.precision)
    runner = ModelRunner(model, arch)
    runner.config_dir = next((d for d in (a.hf_config, a.load, ckpt.root) if d and
                              os.path.isfile(os.path.join(d, "generation_config.json"))), None)
    return runner, tokenizer, tok_dir


def main(argv=None) -> int:
    p = OneLineErrors(prog="generate", description="Generate text from a Megatron checkpoint.")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    a = p.parse_args(argv)
    from megatron_patch.inference.loading import CheckpointError
    try:
        params = sampling_from_args(a)
        if a.max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be >= 1, got {a.max_batch_size}")
        runner, tok, tok_dir = setup_from_args(a)
    except (CheckpointError, ValueError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    eos = eos_ids_of(tok, runner.config_dir)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    engine = engine_from_args(a, runner)
    ids = [tok.encode(text, add_special_tokens=not a.no_bos) for text in a.prompt]
    for out in engine.generate_batch(ids, params, eos_ids=eos):
        if rank0:
            print(tok.decode([t for t in out if t not in eos]), flush=True)
    from megatron_patch import parallel
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
