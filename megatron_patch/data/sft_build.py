"""SFT records -> idxmap: token ids and labels as two parallel megatron indexed datasets.

Output for ``--output-prefix P`` (P is the DATASET_PATH the launcher takes with SFT=true):
  P_input_ids_document.{bin,idx}  int32 token ids, one sequence per sample
  P_labels_document.{bin,idx}     int32 unshifted token labels (ids on answer tokens, -100
                                  elsewhere), same lengths
  P_sft_meta.json                 generation, seq_length, packing, tokenizer vocab, counts
A document is one sample, or with packing the samples packed into one training sequence
(``next_fit_packs`` with capacity seq_length + 1). Samples are cut to seq_length + 1 tokens.
``SFTDataset(P, ..., kind="idxmap")`` reads it back.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Union

import numpy as np

from .indexed_writer import IndexedWriter, OutputGroup
from .pipeline import ordered_map, worker_state
from .problems import InputError, Problem, ProblemLog
from .progress import Progress
from .sft_encode import ID_DTYPE, SFTEncoder, encode_sft_chunk
from .sources import expand_inputs, input_format, iter_chunks

FORMAT = "megatron_patch.sft_idxmap/1"
SFT_FORMATS = ("json", "jsonl", "parquet")


def idxmap_paths(prefix: str) -> Dict[str, str]:
    return {"input_ids": f"{prefix}_input_ids_document", "labels": f"{prefix}_labels_document",
            "meta": f"{prefix}_sft_meta.json"}


@dataclass
class SFTBuildResult:
    prefix: str
    samples: int
    sequences: int        # documents written (== samples without packing)
    tokens: int
    truncated: int
    skipped: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def sft_chunks(files: Sequence[str]):
    for path in files:
        if input_format(path) not in SFT_FORMATS:
            raise InputError(f"{path}: SFT input must be json, jsonl or parquet")
        yield from iter_chunks(path, chunk_records=256, chunk_bytes=1 << 18)


def _encode_chunk(chunk):
    encoder, seq_len = worker_state()
    return encode_sft_chunk(chunk, encoder, seq_len)


class _PackWriter:
    """Streams samples into the two writers, grouping them into packs when asked."""

    def __init__(self, ids: IndexedWriter, labels: IndexedWriter, capacity: int, packing: bool):
        self.ids, self.labels = ids, labels
        self.capacity, self.packing = capacity, packing
        self.pending: List[tuple] = []
        self.used = 0
        self.samples = 0

    def add(self, ids: np.ndarray, labels: np.ndarray) -> None:
        self.samples += 1
        if not self.packing:
            self._write([(ids, labels)])
            return
        if self.pending and self.used + len(ids) > self.capacity:
            self.flush()
        self.pending.append((ids, labels))
        self.used += len(ids)

    def flush(self) -> None:
        if self.pending:
            self._write(self.pending)
        self.pending, self.used = [], 0

    def _write(self, samples) -> None:
        lengths = [len(i) for i, _ in samples]
        self.ids.add_documents(np.concatenate([i for i, _ in samples]), lengths, [len(samples)])
        self.labels.add_documents(np.concatenate([l for _, l in samples]), lengths, [len(samples)])


def build_idxmap_sft_dataset(inputs: Union[str, Sequence[str]], tokenizer, output_prefix: str,
                             seq_length: int, generation: str = "llama3_1",
                             packing: bool = False, workers: int = 1, strict: bool = False,
                             log_interval: int = 1000, quiet: bool = False) -> SFTBuildResult:
    from ..tokenizer import Tokenizer, load_tokenizer

    if seq_length < 2:
        raise ValueError("seq_length must be >= 2")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [os.fspath(inputs)]
    files = expand_inputs(inputs)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    encoder = SFTEncoder(tok, generation)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)

    paths = idxmap_paths(output_prefix)
    progress = Progress(sum(os.path.getsize(f) for f in files), log_interval, quiet,
                        desc="sft samples")
    log = ProblemLog(strict=strict, write=lambda msg: progress.log(msg, force=True))
    group = OutputGroup()
    ids_w = group.add(IndexedWriter(paths["input_ids"], ID_DTYPE))
    labels_w = group.add(IndexedWriter(paths["labels"], ID_DTYPE))
    packer = _PackWriter(ids_w, labels_w, seq_length + 1, packing)
    truncated = 0
    results = ordered_map(_encode_chunk, sft_chunks(files), workers, state=(encoder, seq_length))
    try:
        for enc in results:
            docs = tokens = 0
            for item in enc.items:
                if isinstance(item, Problem):
                    log.add(item)
                else:
                    log.accept()
                    packer.add(*item)
                    docs += 1
                    tokens += len(item[0])
            truncated += enc.truncated
            progress.update(enc.nbytes, docs, tokens)
        packer.flush()
        if packer.samples == 0:
            raise log.nothing_left("SFT samples to write", files)
        meta = {"format": FORMAT, "generation": encoder.generation, "seq_length": seq_length,
                "packing": packing, "tokenizer": os.path.abspath(tok.name_or_path),
                "vocab_size": tok.vocab_size, "samples": packer.samples,
                "sequences": ids_w.num_documents, "tokens": ids_w.num_tokens,
                "truncated": truncated, "skipped": dict(log.counts)}
        group.add_file(paths["meta"], json.dumps(meta, indent=2) + "\n")
        group.commit()
    except BaseException:
        group.abort()
        raise
    finally:
        results.close()
        progress.close()
    if truncated:
        progress.log(f"truncated {truncated} samples to seq_length + 1 = {seq_length + 1} tokens",
                     force=True)
    return SFTBuildResult(output_prefix, packer.samples, ids_w.num_documents, ids_w.num_tokens,
                          truncated, dict(log.counts), progress.seconds)
