"""Pretraining data: megatron-core's GPTDataset over ``<prefix>.bin/.idx`` (blends allowed),
built with BlendedMegatronDatasetBuilder, train/valid split like Megatron-LM's ``--split``.

megatron-core's index builders live in a C++ extension (``megatron.core.datasets.helpers_cpp``)
that the manylinux wheels ship prebuilt. Where it is missing (a source install, another
platform) ``ensure_dataset_helpers`` installs the numpy implementation below under that
name, so the same datasets build everywhere (tests/test_train_data.py checks the two agree).
"""
from __future__ import annotations

import os
import sys
import types
from typing import List, Optional, Sequence, Tuple

import numpy as np

HELPERS_MODULE = "megatron.core.datasets.helpers_cpp"


# ---- numpy fallback for megatron.core.datasets.helpers_cpp --------------------------------
def _build_sample_idx(sizes, document_idx, seq_length, num_epochs, tokens_per_epoch,
                      drop_last_partial_sequence=True, add_extra_token_to_sequence=1,
                      dtype=np.int32):
    """helpers.cpp build_sample_idx. Over the documents (in document_idx order) flattened,
    sample k starts at token k*seq_length; row k = (index into document_idx, offset),
    where, like the C++ walk, the document is the one holding the previous sample's
    (exclusive) end e = k*seq_length + extra, i.e. the first with end >= e, and the offset
    may equal that document's length."""
    assert seq_length > 1 and num_epochs > 0 and tokens_per_epoch > 1
    extra = int(add_extra_token_to_sequence)
    total = int(num_epochs) * int(tokens_per_epoch) - extra
    if drop_last_partial_sequence:
        num_samples = total // seq_length
    else:
        num_samples = int(np.ceil(np.float32(total) / seq_length))
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(document_idx, dtype=np.int64)]
    ends = np.cumsum(lengths)
    k = np.arange(num_samples + 1, dtype=np.int64)
    doc = np.searchsorted(ends, k * seq_length + extra, side="left")
    last = len(lengths) - 1
    past = doc > last          # ran out of documents (a final partial sample)
    doc = np.minimum(doc, last)
    offset = k * seq_length - (ends[doc] - lengths[doc])
    offset[past] = lengths[last] - extra
    doc[0], offset[0] = 0, 0   # the walk starts at the first document, offset 0
    return np.stack([doc, offset], axis=1).astype(dtype)


def _build_blending_indices(dataset_index, dataset_sample_index, weights, num_datasets,
                            size, verbose):
    weights = np.asarray(weights, dtype=np.float64)
    current = np.zeros(num_datasets, dtype=np.int64)
    for i in range(size):
        err = weights * max(float(i), 1.0) - current
        k = int(np.argmax(err))  # first maximum, like the C++ strict '>'
        dataset_index[i] = k
        dataset_sample_index[i] = current[k]
        current[k] += 1


def _build_exhaustive_blending_indices(dataset_index, dataset_sample_index, sizes,
                                       num_datasets):
    sizes = np.asarray(sizes, dtype=np.int64)
    weights = sizes / float(sizes.sum())
    counts = np.zeros(num_datasets, dtype=np.int64)
    unspent = [i for i in range(num_datasets) if sizes[i] > 0]
    i = 0
    while unspent:
        x = max(float(i), 1.0)
        best, best_err = -1, -np.inf
        for d in unspent:  # ascending, strict '>': the first maximum
            e = weights[d] * x - counts[d]
            if e > best_err:
                best, best_err = d, e
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
        if counts[best] == sizes[best]:
            unspent.remove(best)
        i += 1


def numpy_helpers() -> types.ModuleType:
    mod = types.ModuleType(HELPERS_MODULE)
    mod.__doc__ = "numpy implementation of megatron-core's helpers_cpp (megatron_patch)"
    mod.build_sample_idx_int32 = lambda *a: _build_sample_idx(*a, dtype=np.int32)
    mod.build_sample_idx_int64 = lambda *a: _build_sample_idx(*a, dtype=np.int64)
    mod.build_blending_indices = _build_blending_indices
    mod.build_exhaustive_blending_indices = _build_exhaustive_blending_indices
    mod.MEGATRON_PATCH_FALLBACK = True
    return mod


def ensure_dataset_helpers() -> str:
    """Make ``megatron.core.datasets.helpers`` importable. Returns 'cpp' or 'numpy'."""
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401  (present?)
        return "cpp" if not getattr(sys.modules[HELPERS_MODULE], "MEGATRON_PATCH_FALLBACK",
                                    False) else "numpy"
    except ImportError:
        sys.modules[HELPERS_MODULE] = numpy_helpers()
        sys.modules.pop("megatron.core.datasets.helpers", None)
        return "numpy"


# ---- GPTDataset wiring --------------------------------------------------------------------
class TokenIds:
    """What GPTDataset reads from its tokenizer: vocab size and the end-of-document id.
    No ``pad`` attribute: megatron then never masks ids as padding (our documents hold no
    padding; GPTDataset pads nothing in pretraining)."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size = int(vocab_size)
        self.eod = int(eod)
        self.unique_identifiers = {"class": "megatron_patch.TokenIds",
                                   "vocab_size": self.vocab_size, "eod": self.eod}


def default_eod(generation: str) -> int:
    """End-of-document id when no tokenizer is at hand: <|end_of_text|> for Llama-3/3.1,
    </s> for LLaMA-1/2."""
    return 128001 if generation in ("llama3", "llama3_1") else 2


def _split_tokens(prefixes: Sequence[str], split: str) -> List[List[int]]:
    """Tokens each prefix contributes to the train/valid/test splits, with megatron-core's
    rounding (BlendedMegatronDatasetBuilder: documents [round(a*n), round(b*n)))."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    out = []
    for p in prefixes:
        ds = IndexedDataset(p)  # keep it alive: sequence_lengths is a view of its mmap
        lengths = np.array(ds.sequence_lengths, dtype=np.int64)
        del ds
        n = len(lengths)
        row = []
        for bookends in matrix:
            if bookends is None:
                row.append(0)
            else:
                beg, end = int(round(bookends[0] * n)), int(round(bookends[1] * n))
                row.append(int(lengths[beg:end].sum()))
        out.append(row)
    return out


def build_pretrain_datasets(train_paths: Sequence[str], train_weights: Optional[List[float]],
                            valid_paths: Optional[Sequence[str]],
                            valid_weights: Optional[List[float]], seq_len: int, seed: int,
                            num_samples: Tuple[int, int], vocab_size: int, eod: int,
                            split: str = "99,1,0", cache_dir: Optional[str] = None,
                            is_built_on_rank=lambda: True, note=print):
    """(train, valid) GPTDatasets (valid may be None when it gets no samples or documents).

    ``valid_paths`` None: the train blend is split by ``split`` (Megatron's ``--split``);
    else train and valid come from their own blends (``--train-data-path/--valid-data-path``).
    ``num_samples`` = (train samples, valid samples) to draw (epochs repeat as needed).
    """
    ensure_dataset_helpers()
    from megatron.core.datasets.blended_megatron_dataset_builder import \
        BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    for p in list(train_paths) + list(valid_paths or []):
        for ext in (".bin", ".idx"):
            if not os.path.isfile(p + ext):
                raise FileNotFoundError(f"{p}{ext}: missing (pretraining data is an indexed "
                                        "dataset prefix from preprocess_data.py)")
    common = dict(
        random_seed=seed, sequence_length=seq_len, path_to_cache=cache_dir,
        tokenizer=TokenIds(vocab_size, eod), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        mmap_bin_files=True)
    if valid_paths is None:
        # megatron-core loops forever on a split without tokens: check it first
        from megatron.core.datasets.blended_megatron_dataset_config import \
            parse_and_normalize_split
        tokens = _split_tokens(train_paths, split)
        for p, (t, v, _) in zip(train_paths, tokens):
            if t < 2:
                raise ValueError(f"{p}: the training split ({split}) holds no tokens")
        if num_samples[1] and any(v < 2 for _, v, _ in tokens):
            empty = [p for p, (_, v, _) in zip(train_paths, tokens) if v < 2]
            weights = parse_and_normalize_split(split)
            split = f"{weights[0] + weights[1]},0,{weights[2]}"
            note(f"note: the validation split of {', '.join(empty)} has no documents (too "
                 f"few for MP_DATA_SPLIT); no validation: give VALID_DATASET_PATH")
        config = GPTDatasetConfig(blend=(list(train_paths), train_weights), split=split, **common)
    else:
        config = GPTDatasetConfig(blend_per_split=[(list(train_paths), train_weights),
                                                   (list(valid_paths), valid_weights), None],
                                  **common)
    sizes = [int(num_samples[0]), int(num_samples[1]), 0]
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:  # the rank megatron builds on
        from megatron_patch.data.index_cache import repair_index_cache
        for base in repair_index_cache(cache_dir):
            note(f"note: dataset index cache {base} in {cache_dir} was damaged (a crash while "
                 f"it was written?); rebuilding it")
    import logging
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank,
                                                    config).build()
    if train is None or len(train) == 0:
        raise ValueError(f"no training samples of {seq_len + 1} tokens in "
                         f"{' '.join(train_paths)}")
    if valid is not None and len(valid) == 0:
        valid = None
    return train, valid
