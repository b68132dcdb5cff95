"""The OpenAI HTTP API as this server speaks it: request validation and response bodies.

Plain dictionaries in and out (no web framework here), so the rules are testable alone.
A request names only fields we know: a field we honour, one we accept and ignore (``user``,
``metadata``...), or an OpenAI feature we do not offer (``logprobs``, ``tools``, ``n > 1``...)
given at its "off" value. Anything else is a 400 naming the field, as is a value of the
wrong type or range; an unknown model is a 404 (what vLLM's OpenAI server does).

Extras as in vLLM: ``top_k``, ``repetition_penalty``. Defaults follow OpenAI (temperature 1,
completions max_tokens 16, chat: the rest of the context) unless the checkpoint's
``generation_config.json`` sets temperature / top_p / top_k / repetition_penalty.
"""
from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from megatron_patch.inference.sampling import SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = \
            status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code or self.status}}


@dataclass
class ModelCard:
    """What the server knows about its one model."""
    name: str
    max_length: int
    vocab_size: int
    encode: Callable[[str, bool], List[int]]          # (text, add_special_tokens) -> ids
    render_chat: Callable[[List[dict]], str]          # messages -> prompt text
    defaults: Dict[str, float] = field(default_factory=dict)  # from generation_config.json
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class GenRequest:
    kind: str                 # "completion" | "chat"
    model: str
    prompts: List[List[int]]  # one row per prompt (completions may batch several)
    params: SamplingParams
    stop: List[str]
    stream: bool
    include_usage: bool
    id: str = ""


# ---- field rules ----------------------------------------------------------------------
def _number(lo=None, hi=None, lo_open=False, integer=False):
    def check(name, v):
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if not ok or isinstance(v, bool):
            raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, "
                           f"got {v!r}", name)
        if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, " \
                  f"{hi if hi is not None else 'inf'}]"
            raise ApiError(400, f"'{name}' must be in {rng}, got {v}", name)
        return v
    return check


def _bool(name, v):
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {v!r}", name)
    return v


def _stop(name, v):
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"'{name}' must be a string or a list of strings", name)
    return [s for s in stops if s]


def _stream_options(name, v):
    if not isinstance(v, dict) or set(v) - {"include_usage", "continuous_usage_stats"}:
        raise ApiError(400, f"'{name}' supports only include_usage", name)
    return _bool(f"{name}.include_usage", v.get("include_usage", False))


COMMON = {
    "model": None, "stream": _bool, "stream_options": _stream_options, "stop": _stop,
    "temperature": _number(0.0), "top_p": _number(0.0, 1.0, lo_open=True),
    "top_k": _number(-1, integer=True), "seed": _number(integer=True),
    "repetition_penalty": _number(0.0, lo_open=True),
    "presence_penalty": _number(-2.0, 2.0), "frequency_penalty": _number(-2.0, 2.0),
    "max_tokens": _number(1, integer=True),
}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls",
           "prompt_cache_key", "safety_identifier"}
# OpenAI features we do not offer: accepted only at their "off" value
OFF_VALUES = {"n": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,),
              "suffix": ("",), "best_of": (1,), "logit_bias": ({},), "tools": ([],),
              "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
              "response_format": ({"type": "text"},)}
COMPLETION_ONLY = {"prompt", "echo", "suffix", "best_of"}
CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
             "functions", "function_call", "response_format"}


def _check_fields(body: Any, kind: str, card: ModelCard) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    other = CHAT_ONLY if kind == "completion" else COMPLETION_ONLY
    known = set(COMMON) | IGNORED | set(OFF_VALUES) | COMPLETION_ONLY | CHAT_ONLY
    for name, v in body.items():
        if name not in known or name in other:
            where = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
            raise ApiError(400, f"unsupported field '{name}' for {where}", name)
        if name in OFF_VALUES and v is not None and v not in OFF_VALUES[name]:
            raise ApiError(400, f"'{name}'={v!r} is not supported by this server", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required", "model")
    if model != card.name:
        raise ApiError(404, f"The model '{model}' does not exist (this server serves "
                       f"'{card.name}')", "model", code="model_not_found")
    return {name: (COMMON[name](name, v) if COMMON.get(name) and v is not None else v)
            for name, v in body.items() if name in COMMON}


def _sampling(v: dict, card: ModelCard, max_new: int) -> SamplingParams:
    d = card.defaults

    def get(name, default):
        x = v.get(name)
        return x if x is not None else d.get(name, default)

    top_k = get("top_k", 0)
    seed = v.get("seed")
    try:
        return SamplingParams(
            max_new_tokens=max_new, temperature=float(get("temperature", 1.0)),
            top_k=0 if top_k < 0 else int(top_k), top_p=float(get("top_p", 1.0)),
            seed=int(seed) if seed is not None else random.randrange(2 ** 31),
            repetition_penalty=float(get("repetition_penalty", 1.0)),
            presence_penalty=float(v.get("presence_penalty") or 0.0),
            frequency_penalty=float(v.get("frequency_penalty") or 0.0))
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def _budget(card: ModelCard, prompts: List[List[int]], max_tokens: Optional[int],
            default: Optional[int], param: str) -> int:
    longest = max(len(p) for p in prompts)
    if longest >= card.max_length:
        raise ApiError(400, f"This model's maximum context length is {card.max_length} "
                       f"tokens; the prompt has {longest}", "prompt")
    room = card.max_length - longest
    if max_tokens is None:
        return min(default, room) if default else room
    if max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {card.max_length} "
                       f"tokens. However, you requested {longest + max_tokens} tokens "
                       f"({longest} in the prompt, {max_tokens} in the completion)", param)
    return max_tokens


def parse_completion(body: Any, card: ModelCard) -> GenRequest:
    v = _check_fields(body, "completion", card)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [card.encode(prompt, True)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [card.encode(p, True) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    elif (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and all(
            isinstance(t, int) for t in p) for p in prompt)):
        prompts = prompt
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token "
                       "ids or a list of such lists", "prompt")
    for p in prompts:
        if any(not 0 <= t < card.vocab_size for t in p):
            raise ApiError(400, f"token ids must be in [0, {card.vocab_size})", "prompt")
        if not p:
            raise ApiError(400, "empty prompt", "prompt")
    max_new = _budget(card, prompts, v.get("max_tokens"), 16, "max_tokens")
    return GenRequest("completion", card.name, prompts, _sampling(v, card, max_new),
                      v.get("stop") or [], bool(v.get("stream")), bool(v.get("stream_options")),
                      id=f"cmpl-{uuid.uuid4().hex}")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(raw: Any) -> List[dict]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where}: role must be one of {sorted(ROLES)}", where)
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"{where}: only text content parts are supported", where)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}: content must be a string or text parts", where)
        out.append({"role": ROLES[m["role"]], "content": content})
    return out


def parse_chat(body: Any, card: ModelCard) -> GenRequest:
    v = _check_fields(body, "chat", card)
    messages = _messages(body.get("messages"))
    try:
        text = card.render_chat(messages)
    except Exception as e:  # the template's own rules (e.g. roles must alternate)
        raise ApiError(400, f"chat template: {e}", "messages") from None
    prompts = [card.encode(text, False)]
    mct = body.get("max_completion_tokens")
    if mct is not None:
        COMMON["max_tokens"]("max_completion_tokens", mct)
    param = "max_completion_tokens" if mct is not None else "max_tokens"
    max_new = _budget(card, prompts, mct if mct is not None else v.get("max_tokens"), None,
                      param)
    return GenRequest("chat", card.name, prompts, _sampling(v, card, max_new),
                      v.get("stop") or [], bool(v.get("stream")), bool(v.get("stream_options")),
                      id=f"chatcmpl-{uuid.uuid4().hex}")


# ---- responses --------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _head(req: GenRequest, obj: str) -> dict:
    return {"id": req.id, "object": obj, "created": int(time.time()), "model": req.model}


def response(req: GenRequest, texts: List[str], reasons: List[str], n_new: List[int]) -> dict:
    """The non-streaming body."""
    if req.kind == "completion":
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        out = _head(req, "text_completion")
    else:
        choices = [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                    "logprobs": None, "finish_reason": reasons[0]}]
        out = _head(req, "chat.completion")
    out.update(choices=choices,
               usage=usage(sum(len(p) for p in req.prompts), sum(n_new)))
    return out


def chunk(req: GenRequest, index: int, text: Optional[str] = None,
          finish_reason: Optional[str] = None, role: bool = False) -> dict:
    """One streamed event: new text of choice ``index`` and/or its finish reason."""
    if req.kind == "completion":
        choice = {"index": index, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}
        out = _head(req, "text_completion")
    else:
        delta = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None,
                  "finish_reason": finish_reason}
        out = _head(req, "chat.completion.chunk")
    out["choices"] = [choice]
    return out


def usage_chunk(req: GenRequest, n_new: int) -> dict:
    out = _head(req, "chat.completion.chunk" if req.kind == "chat" else "text_completion")
    out.update(choices=[], usage=usage(sum(len(p) for p in req.prompts), n_new))
    return out


def models(card: ModelCard) -> dict:
    return {"object": "list", "data": [{"id": card.name, "object": "model",
                                        "created": card.created, "owned_by": "megatron_patch",
                                        "max_model_len": card.max_length}]}
