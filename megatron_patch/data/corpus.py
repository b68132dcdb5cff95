"""Small real-text data that needs no download (quickstart, tests, benchmark).

- Pretraining corpus: the Python Language Reference topics that every CPython ships as
  ``pydoc_data/topics.py`` (PSF License): ~0.45 MB of English technical prose, one JSONL
  document per section (sections are separated by two blank lines in the source). Built at
  run time and cached, because its exact text follows the installed Python release.
- SFT samples: ``assets/sft_alpaca_samples.json`` and ``assets/sft_conversation_samples.json``,
  written for this project (see assets/README.md).
"""
from __future__ import annotations

import json
import os
import sys
from typing import List

_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
SFT_SAMPLES = {"alpaca": "sft_alpaca_samples.json",
               "conversation": "sft_conversation_samples.json"}


def cache_dir() -> str:
    return os.environ.get("MEGATRON_PATCH_DATA_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "megatron_patch"))


def corpus_documents() -> List[dict]:
    """[{"id", "title", "text"}] from pydoc_data.topics, in a fixed order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions split pydoc_data out
        raise FileNotFoundError("the bundled corpus is built from the Python standard "
                                "library's pydoc_data.topics, which this Python lacks") from exc
    docs = []
    for title in sorted(topics):
        sections = [s.strip("\n") for s in topics[title].split("\n\n\n")]
        for k, text in enumerate(s for s in sections if s.strip()):
            docs.append({"id": f"{title}/{k}", "title": title, "text": text})
    return docs


def bundled_corpus_path() -> str:
    """JSONL file (key ``text``) of the corpus above, written once per Python release."""
    v = sys.version_info
    path = os.path.join(cache_dir(), f"python{v.major}.{v.minor}.{v.micro}_reference.jsonl")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in corpus_documents():
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        os.replace(tmp, path)  # atomic: concurrent first calls both end with the same file
    return path


def bundled_sft_path(kind: str = "alpaca") -> str:
    """``alpaca`` ({instruction, input, output}) or ``conversation`` records (JSON array)."""
    if kind not in SFT_SAMPLES:
        raise ValueError(f"kind {kind!r}: choose one of {', '.join(SFT_SAMPLES)}")
    return os.path.join(_ASSETS, SFT_SAMPLES[kind])
