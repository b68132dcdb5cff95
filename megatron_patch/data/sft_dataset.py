"""SFTDataset: the instruction-tuning dataset the training loop reads.

    SFTDataset(path, tokenizer, seq_len, kind="idxmap" | "raw", generation="llama3_1",
               packing=False)

``kind="idxmap"``: ``path`` is the ``--output-prefix`` given to build_idxmap_sft_dataset.py.
``kind="raw"``: ``path`` is a json/jsonl/parquet file (or dir/glob) of alpaca or conversation
records, tokenised here with the generation's template (``MP_DATASET_TYPE=raw``). Both
paths share one tokenisation (``sft_encode``), so the same records give identical items.

Item ``i`` is ``{"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len]}`` in
megatron's convention:
  input_ids[t]  token t of the sample (of the pack), ``tokenizer.pad_id`` after its end
  labels[t]     the target for position t, i.e. the id of token t + 1 when token t + 1 is an
                answer token (assistant text and the EOS/<|eot_id|> closing it), else -100;
                -100 on padding. The loss is cross_entropy(logits[t], labels[t]) over
                labels != -100; no further shifting.
Samples longer than seq_len + 1 tokens are truncated; a sample left without any answer
token is dropped (counted in ``self.skipped``). ``packing=True`` concatenates consecutive
samples up to seq_len + 1 tokens per item and then also returns ``position_ids`` (restarting
at 0 for each sample) and ``cu_seqlens`` (int32 [n + 1]: where each of the item's n
segments starts, then seq_len; the padding after the last sample is a segment of its own):
the training step hands them to megatron-core as PackedSeqParams (THD), so attention and
rotary positions restart at every sample and a packed sample sees exactly what it would see
alone -- in memory linear in seq_len (no [s, s] mask).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Tuple

import numpy as np
import torch

from .problems import InputError, Problem, ProblemLog
from .sft_build import FORMAT, idxmap_paths, sft_chunks
from .sft_encode import SFTEncoder, encode_sft_chunk, has_loss, make_item, next_fit_packs
from .sources import expand_inputs
from .templates import TEMPLATE_FAMILY, normalize_generation

KINDS = ("idxmap", "raw")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _silent(msg: str) -> None:
    pass


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, path: str, tokenizer, seq_len: int, kind: str = "idxmap",
                 generation: str = "llama3_1", packing: bool = False, strict: bool = False,
                 verbose: bool = True):
        from ..tokenizer import Tokenizer, load_tokenizer

        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: choose one of {', '.join(KINDS)}")
        if seq_len < 2:
            raise ValueError("seq_len must be >= 2")
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) \
            else load_tokenizer(tokenizer)
        self.seq_len = seq_len
        self.kind = kind
        self.generation = normalize_generation(generation)
        self.packing = packing
        self.pad_id = self.tokenizer.pad_id
        self.skipped: Dict[str, int] = {}
        log = ProblemLog(strict=strict, write=_stderr if verbose else _silent)
        # per sample (or stored pack): its length after truncation
        lengths = self._open_idxmap(path, log) if kind == "idxmap" else self._load_raw(path, log)
        self.skipped = dict(log.counts)
        self._lengths = lengths
        self._packs: List[List[int]] = next_fit_packs(lengths, seq_len + 1) if packing \
            else [[i] for i in range(len(lengths))]
        if not self._packs:
            raise log.nothing_left("SFT samples to train on", [path])

    # -- sources ---------------------------------------------------------------------------
    def _load_raw(self, path: str, log: ProblemLog) -> List[int]:
        encoder = SFTEncoder(self.tokenizer, self.generation)
        self._samples: List[Tuple[np.ndarray, np.ndarray]] = []
        for chunk in sft_chunks(expand_inputs([path])):
            for item in encode_sft_chunk(chunk, encoder, self.seq_len).items:
                if isinstance(item, Problem):
                    log.add(item)
                else:
                    log.accept()
                    self._samples.append(item)
        return [len(ids) for ids, _ in self._samples]

    def _open_idxmap(self, prefix: str, log: ProblemLog) -> List[int]:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        paths = idxmap_paths(prefix)
        if not os.path.exists(paths["meta"]):
            raise InputError(f"{prefix}: not an SFT idxmap ({paths['meta']} missing); build it "
                             "with toolkits/sft_data_preprocessing/build_idxmap_sft_dataset.py")
        with open(paths["meta"], encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise InputError(f"{paths['meta']}: unknown format {meta.get('format')!r}")
        if meta["vocab_size"] != self.tokenizer.vocab_size:
            raise InputError(f"{prefix}: built with a {meta['vocab_size']}-token vocabulary "
                             f"({meta['tokenizer']}), but the tokenizer has "
                             f"{self.tokenizer.vocab_size}")
        if TEMPLATE_FAMILY[meta["generation"]] != TEMPLATE_FAMILY[self.generation]:
            raise InputError(f"{prefix}: built with the {meta['generation']} chat template, "
                             f"training generation is {self.generation}")
        self.meta = meta
        self._ids = IndexedDataset(paths["input_ids"])
        self._labels = IndexedDataset(paths["labels"])
        docs = self._ids.document_indices
        if not np.array_equal(docs, self._labels.document_indices) or not np.array_equal(
                self._ids.sequence_lengths, self._labels.sequence_lengths):
            raise InputError(f"{prefix}: input_ids and labels datasets do not match")
        self._doc_bounds = np.stack([docs[:-1], docs[1:]], axis=1)
        lengths = np.add.reduceat(self._ids.sequence_lengths.astype(np.int64), docs[:-1]) \
            if len(docs) > 1 else np.zeros(0, np.int64)
        lengths = np.minimum(lengths, self.seq_len + 1)
        keep = np.ones(len(lengths), dtype=bool)
        if meta["seq_length"] > self.seq_len:  # stored samples may lose their answers here
            for d in range(len(lengths)):
                if not has_loss(self._doc(d)[1], self.seq_len):
                    keep[d] = False
                    log.add(Problem(prefix, d, "no answer token within seq_len",
                                          f"seq_len {self.seq_len}", unit="sample"))
        self._doc_map = np.nonzero(keep)[0]
        if keep.any():
            log.accept()
        return [int(n) for n in lengths[keep]]

    def _doc(self, d: int) -> Tuple[np.ndarray, np.ndarray]:
        start, stop = self._doc_bounds[d]
        ids = self._ids[int(start):int(stop)]
        labels = self._labels[int(start):int(stop)]
        return np.concatenate(ids), np.concatenate(labels)

    def sample(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Unit ``i`` before packing/padding: (ids, unshifted token labels), truncated."""
        if self.kind == "raw":
            ids, labels = self._samples[i]
        else:
            ids, labels = self._doc(int(self._doc_map[i]))
        return ids[:self.seq_len + 1], labels[:self.seq_len + 1]

    # -- torch Dataset ---------------------------------------------------------------------
    def __getstate__(self):
        # DataLoader workers (spawn) only need the arrays and pad_id, not the 7 MB tokenizer
        state = dict(self.__dict__)
        state["tokenizer"] = None
        return state

    def __len__(self) -> int:
        return len(self._packs)

    def num_tokens(self, idx: int) -> int:
        """Input positions of item ``idx`` that hold sample tokens, not padding (what a
        tokens/s figure counts)."""
        return min(sum(self._lengths[i] for i in self._packs[idx]), self.seq_len)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        parts = [self.sample(i) for i in self._packs[idx]]
        ids = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        input_ids, targets = make_item(ids, labels, self.seq_len, self.pad_id)
        item = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(targets)}
        if self.packing:
            item.update(pack_boundaries([len(p[0]) for p in parts], self.seq_len))
        return item


def pack_boundaries(lengths: List[int], seq_len: int) -> Dict[str, torch.Tensor]:
    """The samples of one packed row, by their lengths (the last may run past seq_len):
    ``cu_seqlens`` (int32, segment starts then seq_len; padding is a segment of its own)
    and ``position_ids`` (restarting at 0 for every segment)."""
    starts = np.concatenate([[0], np.cumsum(lengths)])
    bounds = np.unique(np.minimum(starts, seq_len))  # sorted; drops samples cut off whole
    if bounds[-1] < seq_len:
        bounds = np.append(bounds, seq_len)
    position_ids = np.arange(seq_len, dtype=np.int64)
    position_ids -= np.repeat(bounds[:-1], np.diff(bounds))
    return {"cu_seqlens": torch.from_numpy(bounds.astype(np.int32)),
            "position_ids": torch.from_numpy(position_ids)}
