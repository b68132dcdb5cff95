"""Text generation from a megatron-core Llama: greedy or sampled (temperature, top-k, top-p),
max new tokens, stop on EOS ids or on a caller's stop test. Runs on every rank of the
model-parallel group; every rank returns the same tokens.

CLI (one prompt, or several with --prompt repeated):

    python -m megatron_patch.inference.generate --load CKPT --tokenizer TOK_DIR \
        --prompt "The capital of France is" [--max-new-tokens 64] [--temperature 0.7 --top-p 0.9]
    torchrun --nproc_per_node 2 -m megatron_patch.inference.generate --tp 2 ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

import torch
import torch.distributed as dist


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0   # 0: greedy (argmax)
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1: off
    seed: int = 1234

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def next_token(logits: torch.Tensor, params: SamplingParams,
               generator: Optional[torch.Generator] = None) -> int:
    """One token from fp32 logits [vocab]: argmax when greedy, else sample after
    temperature, then top-k, then top-p filtering (transformers' order)."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        order = torch.argsort(scores, descending=True)
        probs = torch.softmax(scores[order], dim=-1)
        # drop a token once the tokens ranked above it already cover top_p
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop[0] = False
        scores = scores.clone()
        scores[order[drop]] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _tp_broadcast(t: torch.Tensor) -> torch.Tensor:
    """Make the TP ranks of the last stage agree on a sampled value (rank 0 of TP decides)."""
    from megatron.core import parallel_state
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(t, src=parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
    return t


def generate(runner, prompt: List[int], params: SamplingParams = SamplingParams(),
             eos_ids: Iterable[int] = (), stop: Optional[Callable[[List[int]], bool]] = None,
             on_token: Optional[Callable[[int], None]] = None) -> List[int]:
    """New tokens after ``prompt`` (ids). Stops at ``max_new_tokens``, the model's context
    length, an id in ``eos_ids`` (included in the result) or when ``stop(new_tokens)`` is true.
    ``on_token`` is called with each new id (streaming output)."""
    if not prompt:
        raise ValueError("generate needs a non-empty prompt (add a BOS token)")
    eos = set(int(e) for e in eos_ids)
    gen = None if params.greedy else torch.Generator().manual_seed(params.seed)
    tokens = list(prompt)
    new: List[int] = []
    for _ in range(params.max_new_tokens):
        if len(tokens) >= runner.max_length:
            break
        logits = runner.logits(torch.tensor([tokens], dtype=torch.long))
        tok = None
        if logits is not None:
            tok = torch.tensor([next_token(logits[0, -1], params, gen)], dtype=torch.long,
                               device=runner.device)
            if not params.greedy:
                tok = _tp_broadcast(tok)
        t = int(runner.share(tok, (1,), torch.long)[0])
        tokens.append(t)
        new.append(t)
        if on_token is not None:
            on_token(t)
        if t in eos or (stop is not None and stop(new)):
            break
    return new


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
def add_model_args(p: argparse.ArgumentParser) -> None:
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
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=1234)


def sampling_from_args(a) -> SamplingParams:
    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                          top_k=a.top_k, top_p=a.top_p, seed=a.seed)


def setup_from_args(a):
    """Init distributed + model parallel, load tokenizer and model.
    -> (runner, tokenizer, tokenizer directory)."""
    import megatron_patch  # noqa: F401  (activates the backend)
    from megatron_patch import parallel
    from megatron_patch.inference.loading import find_checkpoint, load_model, resolve_arch
    from megatron_patch.inference.runner import ModelRunner
    from megatron_patch.tokenizer import load_tokenizer

    ckpt = find_checkpoint(a.load)
    arch = resolve_arch(a.load, a.hf_config, a.model_size)
    tok_dir = a.tokenizer or next((d for d in (a.hf_config, a.load, ckpt.root)
                                   if d and os.path.isdir(d) and
                                   os.path.exists(os.path.join(d, "tokenizer_config.json"))),
                                  None)
    if tok_dir is None:
        raise ValueError("no tokenizer next to the checkpoint: pass --tokenizer <HF tokenizer "
                         "directory>")
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
    p = argparse.ArgumentParser(description="Generate text from a Megatron checkpoint.")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several")
    p.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    a = p.parse_args(argv)
    from megatron_patch.inference.loading import CheckpointError
    try:
        params = sampling_from_args(a)
        runner, tok, tok_dir = setup_from_args(a)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    eos = eos_ids_of(tok, runner.config_dir)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for text in a.prompt:
        ids = tok.encode(text, add_special_tokens=not a.no_bos)
        out = generate(runner, ids, params, eos_ids=eos)
        if rank0:
            print(tok.decode([t for t in out if t not in eos]), flush=True)
    from megatron_patch import parallel
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
