"""The reference generation path: every step runs the whole sequence again (no KV cache),
one prompt at a time. Exact and simple; the KV-cached engine (``engine``) is tested to give
the same greedy tokens. Runs on every rank of the model-parallel group; every rank returns
the same tokens.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import torch

from megatron_patch.inference.sampling import SamplingParams, next_token, tp_agree


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
            tok = torch.tensor([next_token(logits[0, -1], params, gen, prompt, new)],
                               dtype=torch.long, device=runner.device)
            if not params.greedy:
                tok = tp_agree(tok)
        t = int(runner.share(tok, (1,), torch.long)[0])
        tokens.append(t)
        new.append(t)
        if on_token is not None:
            on_token(t)
        if t in eos or (stop is not None and stop(new)):
            break
    return new
