"""Our bin/idx writer against megatron-core's IndexedDatasetBuilder: same bytes, same reads."""
import os

import numpy as np
import pytest
import torch

from megatron_patch.data.indexed_writer import IndexedWriter, optimal_dtype


def _docs(seed, n, high):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, high, size=int(rng.integers(1, 60))) for _ in range(n)]
    docs.insert(3, np.zeros(0, dtype=np.int64))  # an empty sequence is legal in the format
    return docs


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("dtype,high", [(np.uint16, 32000), (np.int32, 128256)])
def test_bytes_identical_to_megatron_builder(tmp_path, dtype, high):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    docs = _docs(0, 40, high)
    ref = str(tmp_path / "ref")
    builder = IndexedDatasetBuilder(ref + ".bin", dtype=dtype)
    for d in docs:
        builder.add_item(torch.from_numpy(d))
        builder.end_document()
    builder.finalize(ref + ".idx")

    ours = str(tmp_path / "ours")
    w = IndexedWriter(ours, dtype)
    for part in (docs[:17], docs[17:]):  # batches, as the tool feeds it
        w.add_documents(np.concatenate(part), [len(d) for d in part])
    w.finish()
    w.commit()
    assert _read(ours + ".bin") == _read(ref + ".bin")
    assert _read(ours + ".idx") == _read(ref + ".idx")
    ds = IndexedDataset(ours)
    assert len(ds) == len(docs)
    assert ds.index.dtype == dtype
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d.tolist()


def test_multi_sequence_documents_match_builder(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    rng = np.random.default_rng(1)
    docs = [[rng.integers(-100, 128256, size=int(rng.integers(1, 30))) for _ in range(k)]
            for k in (1, 3, 2, 1, 4)]
    ref = str(tmp_path / "ref")
    builder = IndexedDatasetBuilder(ref + ".bin", dtype=np.int32)
    for seqs in docs:
        builder.add_document(np.concatenate(seqs), [len(s) for s in seqs])
    builder.finalize(ref + ".idx")
    ours = str(tmp_path / "ours")
    w = IndexedWriter(ours, np.int32)
    w.add_documents(np.concatenate([s for seqs in docs for s in seqs]),
                    [len(s) for seqs in docs for s in seqs], [len(seqs) for seqs in docs])
    w.finish()
    w.commit()
    assert _read(ours + ".bin") == _read(ref + ".bin")
    assert _read(ours + ".idx") == _read(ref + ".idx")
    assert IndexedDataset(ours).document_indices.tolist() == [0, 1, 4, 6, 7, 11]


def test_out_of_range_id_is_refused(tmp_path):
    w = IndexedWriter(str(tmp_path / "x"), np.uint16)
    with pytest.raises(OverflowError):
        w.add_documents(np.array([1, 70000]), [2])
    w.abort()
    assert os.listdir(tmp_path) == []


def test_nothing_under_final_names_until_commit(tmp_path):
    w = IndexedWriter(str(tmp_path / "x"), np.int32)
    w.add_documents(np.arange(5), [5])
    w.finish()
    assert not any(n.endswith((".bin", ".idx")) for n in os.listdir(tmp_path))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_optimal_dtype_follows_megatron():
    from megatron.core.datasets.indexed_dataset import DType
    for vocab in (32000, 65499, 65500, 128256):
        assert optimal_dtype(vocab) == DType.optimal_dtype(vocab)
