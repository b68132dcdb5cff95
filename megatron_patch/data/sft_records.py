"""SFT records -> chat messages ``[{"role": system|user|assistant, "content": str}]``.

Accepted records (JSON/JSONL/parquet):
  alpaca        {"instruction", "input" (optional), "output", "system" (optional)}
  conversation  {"id", "conversations": [{"from": "human"|"gpt"|"system", "value"}], "system"?}
                ("user"/"assistant" are accepted as ``from`` too)
  messages      {"messages": [{"role", "content"}]}
"""
from __future__ import annotations

from typing import List

from .problems import RecordError
from .templates import alpaca_prompt, alpaca_user_content

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "chatgpt": "assistant", "system": "system"}
PROMPT_STYLES = ("plain", "alpaca")


def _str_field(record: dict, key: str, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise RecordError(f"missing key '{key}'")
        return ""
    if not isinstance(record[key], str):
        raise RecordError(f"key '{key}' is not a string", type(record[key]).__name__)
    return record[key]


def record_to_messages(record) -> List[dict]:
    if not isinstance(record, dict):
        raise RecordError("record is not a JSON object", type(record).__name__)
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise RecordError("'conversations' is not a list")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise RecordError("conversation turn needs 'from' and 'value'", f"turn {i + 1}")
            role = _ROLES.get(str(t["from"]).lower())
            if role is None:
                raise RecordError(f"unknown speaker {t['from']!r}", "use human, gpt or system")
            messages.append({"role": role, "content": t["value"]})
        system = _str_field(record, "system", required=False)
    elif "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise RecordError("'messages' is not a list of objects")
        messages = [{"role": t.get("role"), "content": t.get("content")} for t in turns]
        system = ""
    elif "instruction" in record or "output" in record:
        instruction = _str_field(record, "instruction")
        output = _str_field(record, "output")
        extra = _str_field(record, "input", required=False)
        messages = [{"role": "user", "content": alpaca_user_content(instruction, extra)},
                    {"role": "assistant", "content": output}]
        system = _str_field(record, "system", required=False)
    else:
        raise RecordError("unknown SFT record",
                          "needs instruction/output, conversations or messages")
    if system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def alpaca_to_conversation(record: dict, record_id, prompt_style: str = "plain") -> dict:
    """An alpaca record as a conversation record. ``plain``: the human turn is the
    instruction (+ input), and our SFT tools add the generation's template; ``alpaca``: the
    human turn carries the classic alpaca prompt (the FastChat/MindFormers file layout)."""
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {prompt_style!r}: choose one of {', '.join(PROMPT_STYLES)}")
    if not isinstance(record, dict):
        raise RecordError("record is not a JSON object", type(record).__name__)
    instruction = _str_field(record, "instruction")
    output = _str_field(record, "output")
    extra = _str_field(record, "input", required=False)
    if not instruction.strip() or not output.strip():
        raise RecordError("empty message", "blank instruction or output")
    human = alpaca_user_content(instruction, extra) if prompt_style == "plain" \
        else alpaca_prompt(instruction, extra)
    turns = []
    system = _str_field(record, "system", required=False)
    if system.strip():
        turns.append({"from": "system", "value": system})
    turns += [{"from": "human", "value": human}, {"from": "gpt", "value": output}]
    return {"id": str(record_id), "conversations": turns}
