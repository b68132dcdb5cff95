"""Chat templates per Llama generation, rendered in Python as (text, trainable) segments.

The rendered text is exactly what the jinja templates in
``megatron_patch.tokenizer.chat_templates`` (and so ``tokenizer.apply_chat_template``)
produce; the segments additionally say which characters the model must learn to write
(assistant answers and the token that closes them), so labels can be derived from the
token offsets of one tokenisation of the whole text.

  llama3, llama3_1  <|begin_of_text|> then per message
                    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
                    trainable: assistant content + <|eot_id|>
  llama2            <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>...
                    trainable: answer + " </s>"
  llama (LLaMA-1)   <s>{system or the alpaca preamble}\\n\\n then per turn
                    ### Instruction:\\n{user}\\n\\n### Response:\\n{answer}</s>
                    trainable: answer + </s>
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..tokenizer.chat_templates import ALPACA_PREAMBLE
from .problems import RecordError

LLAMA3_HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
TEMPLATE_FAMILY = {"llama": "alpaca", "llama2": "llama2", "llama3": "llama3", "llama3_1": "llama3"}


@dataclass
class Segment:
    text: str
    train: bool


def normalize_generation(name: str) -> str:
    from ..models.llama.presets import normalize_generation as _norm
    return _norm(name)


def check_messages(messages: List[dict]) -> None:
    """Optional leading system message, then user/assistant pairs, ending with an answer."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("empty conversation")
    turns = messages[1:] if messages[0].get("role") == "system" else messages
    if not turns:
        raise RecordError("conversation has no user/assistant turns")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m.get("role") != want:
            raise RecordError("turns must alternate user/assistant",
                              f"turn {i + 1} is {m.get('role')!r}, expected {want!r}")
        if not isinstance(m.get("content"), str):
            raise RecordError("message content is not a string", f"turn {i + 1}")
        if not m["content"].strip():
            raise RecordError("empty message", f"turn {i + 1} ({want})")
    if turns[-1]["role"] != "assistant":
        raise RecordError("conversation ends without an answer")
    if not isinstance(messages[0].get("content"), str):
        raise RecordError("system message is not a string")


def render(messages: List[dict], generation: str, bos_token: Optional[str],
           eos_token: str) -> List[Segment]:
    check_messages(messages)
    family = TEMPLATE_FAMILY[normalize_generation(generation)]
    if family == "llama3":
        return _render_llama3(messages, bos_token)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    if family == "llama2":
        return _render_llama2(turns, system, bos_token or "", eos_token)
    return _render_alpaca(turns, system, bos_token or "", eos_token)


def _render_llama3(messages, bos_token) -> List[Segment]:
    out = [Segment(bos_token or "", False)]
    for m in messages:
        header = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        body = m["content"].strip() + "<|eot_id|>"
        if m["role"] == "assistant":
            out += [Segment(header, False), Segment(body, True)]
        else:
            out.append(Segment(header + body, False))
    return out


def _render_llama2(turns, system, bos, eos) -> List[Segment]:
    out = []
    for i, m in enumerate(turns):
        if m["role"] == "user":
            content = m["content"]
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            out.append(Segment(f"{bos}[INST] {content.strip()} [/INST] ", False))
        else:
            out.append(Segment(f"{m['content'].strip()} {eos}", True))
    return out


def _render_alpaca(turns, system, bos, eos) -> List[Segment]:
    preamble = system.strip() if system is not None else ALPACA_PREAMBLE
    out = [Segment(f"{bos}{preamble}\n\n", False)]
    for m in turns:
        if m["role"] == "user":
            out.append(Segment(f"### Instruction:\n{m['content'].strip()}\n\n### Response:\n",
                               False))
        else:
            out.append(Segment(m["content"].strip() + eos, True))
    return out


# -- alpaca records --------------------------------------------------------------------------
def alpaca_user_content(instruction: str, extra: str = "") -> str:
    """User message of an alpaca record: the instruction, then its input if any."""
    return "\n\n".join(p.strip() for p in (instruction, extra or "") if p.strip())


def alpaca_prompt(instruction: str, extra: str = "") -> str:
    """The classic alpaca prompt (for FastChat/MindFormers-style conversation files)."""
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction.strip()}"
    if extra and extra.strip():
        text += f"\n\n### Input:\n{extra.strip()}"
    return text + "\n\n### Response:"


def alpaca_plain_text(instruction: str, extra: str, output: str) -> str:
    """One alpaca record as a pretraining document: prompt, newline, answer."""
    return f"{alpaca_prompt(instruction, extra)}\n{output.strip()}"
