"""Write megatron ``.bin/.idx`` indexed datasets, byte for byte as megatron-core's
``IndexedDatasetBuilder`` (0.16.1) does, but fed whole batches of documents at once and
written under temporary names that are renamed only when everything succeeded.

Format (little endian; see megatron/core/datasets/indexed_dataset.py):
  .bin  token ids of every sequence, back to back, in ``dtype``
  .idx  b"MMIDIDX\\x00\\x00", <Q version=1, <B dtype code, <Q sequence count,
        <Q document count (+1), int32 sequence lengths, int64 byte pointers,
        int64 document indices (0 and the sequence index after each document)
"""
from __future__ import annotations

import os
import struct
from typing import List, Optional, Sequence

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType codes
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
               np.float32: 7, np.uint16: 8}


def optimal_dtype(vocab_size: Optional[int]):
    """megatron's rule: uint16 when every id fits below 65500, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def tmp_path(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


class IndexedWriter:
    """One ``<prefix>.bin/.idx`` pair. ``add_documents`` takes a flat id array plus per
    sequence lengths and the number of sequences in each document."""

    def __init__(self, prefix: str, dtype=np.int32):
        if dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported dtype {dtype}")
        self.prefix = prefix
        self.dtype = dtype
        self.bin_path, self.idx_path = prefix + ".bin", prefix + ".idx"
        self._bin_tmp, self._idx_tmp = tmp_path(self.bin_path), tmp_path(self.idx_path)
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: List[np.ndarray] = []
        self._seqs_per_doc: List[np.ndarray] = []
        self.num_tokens = 0
        self.num_documents = 0

    def add_documents(self, ids: np.ndarray, lengths: Sequence[int],
                      seqs_per_doc: Optional[Sequence[int]] = None) -> None:
        """Append documents. ``ids`` holds all their sequences back to back; ``lengths``
        one entry per sequence; ``seqs_per_doc`` one entry per document (default: one
        sequence per document)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        ids = np.asarray(ids)
        if int(lengths.sum()) != ids.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {ids.size} ids were given")
        info = np.iinfo(self.dtype)
        if ids.size and (ids.min() < info.min or ids.max() > info.max):
            raise OverflowError(f"id out of range for {np.dtype(self.dtype).name} "
                                f"(min {ids.min()}, max {ids.max()})")
        seqs = np.ones(lengths.size, np.int64) if seqs_per_doc is None \
            else np.asarray(seqs_per_doc, dtype=np.int64)
        if int(seqs.sum()) != lengths.size:
            raise ValueError("seqs_per_doc does not add up to the number of sequences")
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(lengths)
        self._seqs_per_doc.append(seqs)
        self.num_tokens += ids.size
        self.num_documents += seqs.size

    def finish(self) -> None:
        """Close the .bin and write the .idx, still under temporary names."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        seqs = np.concatenate(self._seqs_per_doc) if self._seqs_per_doc else np.zeros(0, np.int64)
        itemsize = np.dtype(self.dtype).itemsize
        pointers = np.zeros(lengths.size, np.int64)
        if lengths.size:
            np.cumsum(lengths[:-1] * itemsize, out=pointers[1:])
        doc_index = np.concatenate([[0], np.cumsum(seqs)]).astype(np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", lengths.size))
            f.write(struct.pack("<Q", doc_index.size))
            f.write(lengths.astype(np.int32).tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_index.tobytes(order="C"))

    def commit(self) -> None:
        """Rename into place: .bin first, .idx last (a reader keys on the .idx)."""
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(p):
                os.remove(p)


class OutputGroup:
    """Several writers (and side files) that appear together or not at all."""

    def __init__(self):
        self.writers: List[IndexedWriter] = []
        self.files: List[tuple] = []  # (tmp, final)

    def add(self, writer: IndexedWriter) -> IndexedWriter:
        self.writers.append(writer)
        return writer

    def add_file(self, final: str, text: str) -> None:
        tmp = tmp_path(final)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        self.files.append((tmp, final))

    def commit(self) -> None:
        for w in self.writers:
            w.finish()
        for w in self.writers:
            w.commit()
        for tmp, final in self.files:
            os.replace(tmp, final)

    def abort(self) -> None:
        for w in self.writers:
            w.abort()
        for tmp, _ in self.files:
            if os.path.exists(tmp):
                os.remove(tmp)
