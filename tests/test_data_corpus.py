"""Bundled corpus and SFT samples: real, non-trivial, reproducible, usable as they are."""
import json

from data_fixtures import llama3_tokenizer, llama3_tokenizer_dir  # noqa: F401

from megatron_patch.data import corpus
from megatron_patch.data.sft_encode import SFTEncoder
from megatron_patch.data.sft_records import record_to_messages


def test_corpus_is_built_once_and_reproducible(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_PATCH_DATA_CACHE", str(tmp_path))
    path = corpus.bundled_corpus_path()
    assert path.startswith(str(tmp_path)) and path.endswith(".jsonl")
    docs = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert docs == corpus.corpus_documents()
    assert len(docs) >= 150 and sum(len(d["text"]) for d in docs) > 300_000
    assert len({d["id"] for d in docs}) == len(docs)
    assert all(d["text"].strip() and d["text"] == d["text"].strip("\n") for d in docs)
    assert any("assert" in d["text"] for d in docs if d["title"] == "assert")
    mtime = (tmp_path / path.split("/")[-1]).stat().st_mtime_ns
    assert corpus.bundled_corpus_path() == path
    assert (tmp_path / path.split("/")[-1]).stat().st_mtime_ns == mtime  # cached, not rewritten


def test_sft_samples_encode_without_skips(llama3_tokenizer):
    enc = SFTEncoder(llama3_tokenizer, "llama3_1")
    alpaca = json.load(open(corpus.bundled_sft_path("alpaca"), encoding="utf-8"))
    conv = json.load(open(corpus.bundled_sft_path("conversation"), encoding="utf-8"))
    assert len(alpaca) >= 30 and any(r["input"] for r in alpaca)
    assert any(len(r["conversations"]) > 2 for r in conv)
    assert any(r["conversations"][0]["from"] == "system" for r in conv)
    messages = [record_to_messages(r) for r in alpaca + conv]
    for ids, labels in enc.encode_messages(messages):
        assert (labels != -100).sum() > 0 and len(ids) < 512
