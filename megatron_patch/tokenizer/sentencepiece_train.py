"""Train a small LLaMA-1/2-style sentencepiece tokenizer and save it as an HF directory.

The options are those of Meta's LLaMA tokenizer (BPE, byte fallback, split digits, no
normalisation, <unk>=0 <s>=1 </s>=2, no pad), so a tokenizer trained here behaves like the
real one at a small vocabulary: for tests and CPU quickstarts that cannot download
Meta's files. Training a few thousand pieces on ~0.5 MB of text takes well under a second.
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable, Optional

from .chat_templates import BY_GENERATION


def _sentences(texts: Iterable[str], max_bytes: int):
    # sentencepiece trains on "sentences"; feed lines, skipping ones it would reject anyway.
    for text in texts:
        for line in text.split("\n"):
            if line.strip() and len(line.encode("utf-8")) <= max_bytes:
                yield line


def train_sentencepiece_tokenizer(dest: str, text_iter: Iterable[str], vocab_size: int = 2000,
                                  chat_template: Optional[str] = None,
                                  model_max_length: int = 4096,
                                  max_sentences: int = 200_000) -> str:
    """Train on ``text_iter`` (documents) and write ``dest`` = tokenizer.model +
    tokenizer.json + tokenizer_config.json + special_tokens_map.json; returns ``dest``.

    ``chat_template``: None, or a generation name ("llama", "llama2", ...) whose template goes
    into tokenizer_config.json (Llama-2-chat tokenizers carry one; base LLaMA ones do not).
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise ValueError("vocab_size must be >= 300 (256 byte pieces + specials + merges)")
    template = None
    if chat_template is not None:
        if chat_template not in BY_GENERATION:
            raise ValueError(f"chat_template {chat_template!r}: choose one of "
                             f"{', '.join(BY_GENERATION)} or None")
        template = BY_GENERATION[chat_template]
    os.makedirs(dest, exist_ok=True)
    # a tokenizer.json left from an earlier run would be loaded instead of the new model
    for stale in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                  "special_tokens_map.json"):
        if os.path.exists(os.path.join(dest, stale)):
            os.remove(os.path.join(dest, stale))
    model = io.BytesIO()
    max_bytes = 8192
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(text_iter, max_bytes), model_writer=model,
            vocab_size=vocab_size, model_type="bpe", byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.99995,
            max_sentence_length=max_bytes, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, num_threads=2, minloglevel=2)
    except RuntimeError as exc:
        raise ValueError(f"sentencepiece training failed (vocab_size={vocab_size}): {exc}") from exc
    with open(os.path.join(dest, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())

    write_llama_spm_hf_files(dest, model_max_length, template)
    return dest


def write_llama_spm_hf_files(dest: str, model_max_length: int = 4096,
                             chat_template: Optional[str] = None) -> None:
    """Next to a LLaMA-1/2 sentencepiece ``dest/tokenizer.model``: tokenizer_config.json and
    special_tokens_map.json as in Meta's HF repositories, and tokenizer.json converted once
    (transformers converts on every load otherwise, ~seconds)."""
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
              "legacy": False, "clean_up_tokenization_spaces": False,
              "model_max_length": model_max_length}
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(dest, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(dest, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2)
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(dest, local_files_only=True)
    hf.backend_tokenizer.save(os.path.join(dest, "tokenizer.json"))
