"""Pretraining data: documents -> ``<prefix>_<key>_document.{bin,idx}`` for megatron's GPTDataset.

Each document is tokenised exactly as ``tokenizer(text)["input_ids"]`` (the tokenizer's own
special tokens, i.e. BOS for every Llama tokenizer; ``add_special_tokens=False`` drops it),
followed by the end-of-document id when ``append_eod``. The main process reads the input and
writes the output; workers decode, parse and tokenise whole chunks, and results are
written in input order, so the files are identical for any number of workers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import chain
from typing import Dict, List, Sequence, Union

import numpy as np

from .handlers import make_handler
from .indexed_writer import IndexedWriter, OutputGroup, optimal_dtype
from .pipeline import ordered_map, worker_state
from .problems import InputError, Problem, ProblemLog, RecordError
from .progress import Progress
from .sources import chunk_records, expand_inputs, input_format, iter_chunks


@dataclass
class PreprocessResult:
    prefixes: Dict[str, str]          # json key -> output prefix (without .bin/.idx)
    documents: int
    tokens: int
    skipped: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def output_prefix_for(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


@dataclass
class _Job:  # what every worker needs (inherited on fork)
    tokenizer: object
    handler: object
    append_eod: bool
    add_special_tokens: bool
    dtype: type


def _tokenize_chunk(chunk):
    """Worker: one chunk -> per output key (flat ids, lengths), skipped records, input bytes."""
    job: _Job = worker_state()
    texts: List[List[str]] = [[] for _ in job.handler.output_keys]
    problems: List[Problem] = []  # in input order
    for line, rec in chunk_records(chunk):
        if isinstance(rec, Problem):
            problems.append(rec)
            continue
        try:
            values = job.handler.texts(rec)
        except RecordError as exc:
            problems.append(Problem(chunk.source, line, exc.kind, exc.detail, chunk.unit))
            continue
        for bucket, text in zip(texts, values):
            bucket.append(text)
    eod = [job.tokenizer.eod_id] if job.append_eod else []
    per_key = []
    for bucket in texts:
        docs = job.tokenizer.encode_batch(bucket, add_special_tokens=job.add_special_tokens)
        if eod:
            docs = [d + eod for d in docs]
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        ids = np.fromiter(chain.from_iterable(docs), dtype=job.dtype, count=int(lengths.sum()))
        per_key.append((ids, lengths))
    return per_key, problems, chunk.nbytes


def _chunks(files, handler, txt_mode, chunk_bytes):
    for path in files:
        yield from iter_chunks(path, columns=handler.read_keys,
                               optional_columns=handler.optional_keys, txt_mode=txt_mode,
                               txt_key=handler.output_keys[0], chunk_bytes=chunk_bytes)


def preprocess_pretrain(inputs: Union[str, Sequence[str]], tokenizer, output_prefix: str,
                        json_keys: Sequence[str] = ("text",),
                        handler_name: str = "GeneralPretrainHandler",
                        append_eod: bool = False, workers: int = 1, log_interval: int = 1000,
                        strict: bool = False, add_special_tokens: bool = True,
                        txt_mode: str = "paragraph", quiet: bool = False,
                        chunk_bytes: int = 1 << 18) -> PreprocessResult:
    """Tokenise ``inputs`` (files, dirs or globs) into one bin/idx pair per output key.

    ``tokenizer``: a ``megatron_patch.tokenizer.Tokenizer`` or a tokenizer directory.
    Raises ``InputError`` (nothing written) for unusable input, or for the first bad record
    when ``strict``; otherwise bad records are skipped, reported and counted.
    """
    from ..tokenizer import Tokenizer, load_tokenizer

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [os.fspath(inputs)]
    files = expand_inputs(inputs)
    handler = make_handler(handler_name, list(json_keys))
    if any(input_format(f) == "txt" for f in files) and len(handler.output_keys) != 1:
        raise InputError("plain-text input holds one text per document; give one --json-keys key")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    dtype = optimal_dtype(tok.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)

    job = _Job(tok, handler, append_eod, add_special_tokens, dtype)
    progress = Progress(sum(os.path.getsize(f) for f in files), log_interval, quiet)
    log = ProblemLog(strict=strict, write=lambda msg: progress.log(msg, force=True))
    group = OutputGroup()
    prefixes = {k: output_prefix_for(output_prefix, k) for k in handler.output_keys}
    writers = [group.add(IndexedWriter(prefixes[k], dtype)) for k in handler.output_keys]
    results = ordered_map(_tokenize_chunk, _chunks(files, handler, txt_mode, chunk_bytes),
                          workers, state=job)
    try:
        for per_key, problems, nbytes in results:
            for problem in problems:
                log.add(problem)  # raises StrictStop with --strict
            if len(per_key[0][1]):
                log.accept()
            for writer, (ids, lengths) in zip(writers, per_key):
                writer.add_documents(ids, lengths)
            progress.update(nbytes, len(per_key[0][1]), sum(int(ids.size) for ids, _ in per_key))
        if writers[0].num_documents == 0:
            raise log.nothing_left("documents to write", files)
        group.commit()
    except BaseException:
        group.abort()
        raise
    finally:
        results.close()
        progress.close()
    return PreprocessResult(prefixes, writers[0].num_documents,
                            sum(w.num_tokens for w in writers), dict(log.counts), progress.seconds)
