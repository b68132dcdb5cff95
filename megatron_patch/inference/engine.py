"""Batched generation with a KV cache, on megatron-core's own static inference context.

The prompt is run once (prefill) and every later step feeds one token per sequence, reusing
the keys/values megatron-core keeps in ``StaticInferenceContext``; the full-recompute
``generate.generate`` stays as the reference (greedy tokens are tested to be identical).

Batches use left padding, so every sequence's next token sits in the same (last) slot:
- each row gets its own rotary positions (slot - padding), so a padded row sees exactly the
  positions it would see alone;
- padded key slots are masked out in prefill and in every decode step; a padded query slot
  attends to itself only (some attention kernels return NaN for an all-masked row, and a
  NaN value in the cache would leak through the zero weights of real tokens);
- a row that finishes leaves the batch (its cache rows are dropped) so the rest run smaller.

Works at any TP / PP (the runner moves hidden states between stages; the last stage's
choice is broadcast). The dynamic engine of megatron-core needs flash-attn; the static
context works with any core attention that honours an explicit mask.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, List, Optional, Sequence, Union

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_patch.inference.recompute import generate as recompute_generate
from megatron_patch.inference.sampling import SamplingParams, next_token, tp_agree

OnToken = Callable[[int, int], None]          # (row, token)
StopTest = Optional[Callable[[List[int]], bool]]  # new tokens of one row -> stop now?


def _as_list(params, n: int) -> List[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{n} prompts but {len(params)} sampling params")
    return params


class _Engine:
    """What both engines offer: ``generate`` (one prompt, like ``generate.generate``) and
    ``generate_batch`` (several prompts, per-row sampling params and stop tests)."""

    def __init__(self, runner, max_batch_size: int = 8):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.runner = runner
        self.max_batch_size = max_batch_size

    @property
    def max_length(self) -> int:
        return self.runner.max_length

    def generate(self, prompt: List[int], params: SamplingParams = SamplingParams(),
                 eos_ids: Iterable[int] = (), stop: StopTest = None,
                 on_token: Optional[Callable[[int], None]] = None) -> List[int]:
        cb = (lambda _row, t: on_token(t)) if on_token is not None else None
        return self.generate_batch([prompt], params, eos_ids, [stop], cb)[0]

    def generate_batch(self, prompts: Sequence[List[int]],
                       params: Union[SamplingParams, Sequence[SamplingParams]] = SamplingParams(),
                       eos_ids: Iterable[int] = (), stops: Optional[Sequence[StopTest]] = None,
                       on_token: Optional[OnToken] = None) -> List[List[int]]:
        """New tokens for each prompt (same rules as ``generate.generate``: EOS included,
        at most ``max_new_tokens`` and the model's context). ``on_token(row, token)``."""
        n = len(prompts)
        params = _as_list(params, n)
        stops = list(stops) if stops is not None else [None] * n
        if any(not p for p in prompts):
            raise ValueError("generate needs non-empty prompts (add a BOS token)")
        eos = set(int(e) for e in eos_ids)
        out: List[List[int]] = []
        for start in range(0, n, self.max_batch_size):
            end = min(n, start + self.max_batch_size)
            cb = None
            if on_token is not None:
                cb = (lambda row, t, _s=start: on_token(_s + row, t))
            out += self._run(list(prompts[start:end]), params[start:end], eos,
                             stops[start:end], cb)
        return out

    def _run(self, prompts, params, eos, stops, on_token) -> List[List[int]]:
        raise NotImplementedError


class RecomputeEngine(_Engine):
    """The reference: every step runs the whole sequence again, one prompt at a time."""

    def _run(self, prompts, params, eos, stops, on_token):
        out = []
        for row, (p, sp, st) in enumerate(zip(prompts, params, stops)):
            cb = (lambda t, _r=row: on_token(_r, t)) if on_token is not None else None
            out.append(recompute_generate(self.runner, p, sp, eos_ids=eos, stop=st, on_token=cb))
        return out


class KVCacheEngine(_Engine):
    """Prefill once, then one token per sequence per step from megatron-core's KV cache."""

    @torch.inference_mode()  # no autograd bookkeeping at all: measurably less per-step overhead
    def _run(self, prompts, params, eos, stops, on_token):
        runner = self.runner
        out: List[List[int]] = [[] for _ in prompts]
        budget = [max(0, min(sp.max_new_tokens, runner.max_length - len(p)))
                  for p, sp in zip(prompts, params)]
        rows = [i for i in range(len(prompts)) if budget[i] > 0]  # batch row -> prompt index
        if not rows:
            return out
        width = max(len(prompts[i]) for i in rows)
        slots = width + max(budget[i] for i in rows)
        pad = torch.tensor([width - len(prompts[i]) for i in rows])
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            tokens[r, int(pad[r]):] = torch.tensor(prompts[i], dtype=torch.long)
        slot = torch.arange(slots)
        positions = (slot[None, :] - pad[:, None]).clamp(0, runner.max_length - 1)  # [b, S]
        key_pad = slot[None, :] < pad[:, None]                                      # [b, S]
        gens = {i: torch.Generator().manual_seed(params[i].seed) for i in rows
                if not params[i].greedy}

        ctx = StaticInferenceContext(len(rows), slots)
        rope = _RowRope(runner)
        with rope.installed(bool(pad.any())):
            rope.positions = positions
            # prefill: megatron's convention, True = masked out; causal spelled out
            # because the default causal mask is built on CUDA
            causal = torch.ones(width, width, dtype=torch.bool).triu(1)
            own = torch.eye(width, dtype=torch.bool)
            mask = causal[None, None] | (key_pad[:, None, None, :width] & ~own)
            logits = runner.forward(tokens, positions[:, :width], mask, ctx)
            ctx.increment_sequence_len_offset(width)
            ctx.enable_decode_mode()
            while True:
                nxt = self._choose(logits, rows, prompts, params, out, gens)
                done = []
                for r, i in enumerate(rows):
                    t = int(nxt[r])
                    out[i].append(t)
                    if on_token is not None:
                        on_token(i, t)
                    if (t in eos or len(out[i]) >= budget[i]
                            or (stops[i] is not None and stops[i](out[i]))):
                        done.append(r)
                if len(done) == len(rows):
                    break
                if done:  # finished rows leave the batch and the cache
                    keep = torch.tensor([r for r in range(len(rows)) if r not in done])
                    rows = [rows[r] for r in keep.tolist()]
                    nxt, positions, key_pad = nxt[keep], positions[keep], key_pad[keep]
                    rope.positions = positions
                    _keep_cache_rows(ctx, keep)
                off = ctx.sequence_len_offset
                step_mask = None
                if bool(key_pad[:, : off + 1].any()):
                    step_mask = key_pad[:, None, None, : off + 1]
                logits = runner.forward(nxt.view(-1, 1), positions[:, off: off + 1],
                                        step_mask, ctx)
                ctx.increment_sequence_len_offset(1)
        return out

    def _choose(self, logits, rows, prompts, params, out, gens) -> torch.Tensor:
        """Next token of each batch row, the same on every rank."""
        runner = self.runner
        nxt = None
        if logits is not None:
            last = logits[:, -1]
            nxt = torch.argmax(last, dim=-1)
            sampled = False
            for r, i in enumerate(rows):
                sp = params[i]
                if sp.greedy and not sp.penalised:
                    continue
                nxt[r] = next_token(last[r], sp, gens.get(i), prompts[i], out[i])
                sampled = sampled or not sp.greedy
            nxt = nxt.to(runner.device).contiguous()
            if sampled:
                nxt = tp_agree(nxt)
        return runner.share(nxt, (len(rows),), torch.long).cpu()


def _keep_cache_rows(ctx: StaticInferenceContext, keep: torch.Tensor) -> None:
    """Only the batch rows ``keep`` stay in every layer's key/value buffers."""
    for layer, (k, v) in ctx.key_value_memory_dict.items():
        idx = keep.to(k.device)
        ctx.key_value_memory_dict[layer] = (k[:, idx], v[:, idx])


class _RowRope:
    """Per-row rotary positions for left-padded batches.

    megatron-core builds one rotary table for slots 0..S-1 and slices it by slot, which
    would give a row padded by P the positions P..P+n-1. Rotary attention only depends on
    position differences, so that is the same function, but not the same rounding as the
    row alone; here the model's rotary module returns, for every slot and row, the row's own
    position (shape [S, b, 1, dim], broadcast over heads by megatron's unfused rope).
    With fused rope (Transformer Engine) the table must stay [S, 1, 1, dim]: slot positions
    are used there.
    """

    def __init__(self, runner):
        model = runner.model
        self.rot = getattr(model, "rotary_pos_emb", None)
        self.fused = bool(getattr(model.config, "apply_rope_fusion", False))
        self.max_length = runner.max_length
        self.positions: Optional[torch.Tensor] = None
        self._cache = (None, None)

    @contextmanager
    def installed(self, padded: bool = True):
        if self.rot is None or self.fused or not padded:  # no padding: slot == position
            yield
            return
        original = self.rot.forward

        def forward(max_seq_len, offset=0, packed_seq=False, cp_group=None):
            if self._cache[0] is not self.positions:
                table = original(self.max_length)  # [max_len, 1, 1, dim], cached by megatron
                rows = table[:, 0, 0][self.positions.t().to(table.device)]  # [S, b, dim]
                self._cache = (self.positions, rows.unsqueeze(2))
            return self._cache[1]

        self.rot.forward = forward
        try:
            yield
        finally:
            del self.rot.forward


ENGINES = {"kv": KVCacheEngine, "recompute": RecomputeEngine}


def make_engine(runner, kind: str = "kv", max_batch_size: int = 8) -> _Engine:
    if kind not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {kind!r}")
    return ENGINES[kind](runner, max_batch_size)
