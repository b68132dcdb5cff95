"""Choosing the next token from logits: sampling parameters and the one rule both generation
paths (full recompute in ``generate``, KV cache in ``engine``) use, so they cannot drift.

Order, as transformers applies its processors: repetition penalty (prompt + generated
tokens, transformers' rule), presence / frequency penalties (generated tokens only, OpenAI's
rule), then argmax when greedy, else temperature, top-k, top-p and a draw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0   # 0: greedy (argmax)
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1: off
    seed: int = 1234
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages any token already present
    presence_penalty: float = 0.0    # OpenAI: subtracted once from tokens generated so far
    frequency_penalty: float = 0.0   # OpenAI: subtracted per occurrence in generated tokens

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt: Sequence[int] = (),
                    new: Sequence[int] = ()) -> torch.Tensor:
    """fp32 logits [vocab] with the penalties of ``params`` applied (a new tensor)."""
    scores = logits.float().clone()
    if params.repetition_penalty != 1.0 and (prompt or new):
        seen = torch.tensor(sorted(set(prompt) | set(new)), dtype=torch.long,
                            device=scores.device)
        s = scores[seen]
        scores[seen] = torch.where(s < 0, s * params.repetition_penalty,
                                   s / params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and new:
        ids = torch.tensor(list(new), dtype=torch.long, device=scores.device)
        counts = torch.bincount(ids, minlength=scores.numel()).to(scores.dtype)
        scores -= counts * params.frequency_penalty + (counts > 0) * params.presence_penalty
    return scores


def next_token(logits: torch.Tensor, params: SamplingParams,
               generator: Optional[torch.Generator] = None, prompt: Sequence[int] = (),
               new: Sequence[int] = ()) -> int:
    """One token from fp32 logits [vocab]; ``prompt``/``new`` are the ids the penalties see."""
    scores = apply_penalties(logits, params, prompt, new) if params.penalised else logits.float()
    if params.greedy:
        return int(torch.argmax(scores))
    scores = scores / params.temperature
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


def tp_agree(t: torch.Tensor) -> torch.Tensor:
    """Make the TP ranks of the last stage agree on sampled values (rank 0 of TP decides):
    a draw must not differ between ranks even if their logits differ in the last bit."""
    from megatron.core import parallel_state
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(t, src=parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
    return t
