"""Pretraining handlers: one input record -> the text of each output dataset.

``GeneralPretrainHandler``: one dataset per ``--json-keys`` key, text = record[key].
``AlpacaPretrainHandler``: alpaca records ``{instruction, input, output}`` rendered as one
plain text (the alpaca prompt followed by the answer) into a single ``text`` dataset.

A record any key of which is missing, not a string, or blank is skipped for every dataset,
so datasets written from several keys stay aligned document for document.
"""
from __future__ import annotations

from typing import List, Sequence

from .problems import RecordError
from .templates import alpaca_plain_text

HANDLERS = ("GeneralPretrainHandler", "AlpacaPretrainHandler")


def _text(record: dict, key: str, required: bool = True) -> str:
    if key not in record:
        if required:
            raise RecordError(f"missing key '{key}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"key '{key}' is not a string", type(value).__name__)
    return value


class GeneralPretrainHandler:
    def __init__(self, keys: Sequence[str]):
        self.output_keys: List[str] = list(keys)
        self.read_keys: List[str] = list(keys)
        self.optional_keys: List[str] = []

    def texts(self, record) -> List[str]:
        if not isinstance(record, dict):
            raise RecordError("record is not a JSON object", type(record).__name__)
        out = [_text(record, k) for k in self.output_keys]
        for k, t in zip(self.output_keys, out):
            if not t.strip():
                raise RecordError("empty document", f"key '{k}'")
        return out


class AlpacaPretrainHandler:
    output_keys = ["text"]
    read_keys = ["instruction", "input", "output"]
    optional_keys = ["input"]

    def texts(self, record) -> List[str]:
        if not isinstance(record, dict):
            raise RecordError("record is not a JSON object", type(record).__name__)
        instruction, output = _text(record, "instruction"), _text(record, "output")
        extra = _text(record, "input", required=False)
        if not instruction.strip() or not output.strip():
            raise RecordError("empty document", "blank instruction or output")
        return [alpaca_plain_text(instruction, extra, output)]


def make_handler(name: str, keys: Sequence[str]):
    if name == "GeneralPretrainHandler":
        return GeneralPretrainHandler(keys)
    if name == "AlpacaPretrainHandler":
        if list(keys) != ["text"]:
            raise ValueError("AlpacaPretrainHandler reads instruction/input/output and writes "
                             "the 'text' dataset; leave --json-keys at its default")
        return AlpacaPretrainHandler()
    raise ValueError(f"handler {name!r}: choose one of {', '.join(HANDLERS)}")
