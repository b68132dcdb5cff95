"""Training data: megatron-core's index helpers (C++ or our numpy fallback), GPTDataset
blends/splits, the resumable micro-batch order, and SFT loss masking."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_patch.data import pretrain as P


def _cpp():
    try:
        from megatron.core.datasets import helpers_cpp
    except ImportError:
        pytest.skip("megatron-core's compiled helpers are not installed here")
    if getattr(helpers_cpp, "MEGATRON_PATCH_FALLBACK", False):
        pytest.skip("the numpy fallback is installed in place of the compiled helpers")
    return helpers_cpp


def test_numpy_helpers_equal_cpp():
    cpp, npy = _cpp(), P.numpy_helpers()
    rng = np.random.RandomState(0)
    for trial in range(40):
        n_docs = rng.randint(1, 30)
        sizes = rng.randint(0 if trial % 3 else 1, 60, size=n_docs).astype(np.int32)
        sizes[rng.randint(n_docs)] = max(2, sizes.max())
        epochs = rng.randint(1, 4)
        doc_idx = np.concatenate([rng.permutation(n_docs) for _ in range(epochs)]).astype(np.int32)
        tokens = int(sizes.sum())
        seq = int(rng.randint(2, 40))
        if tokens * epochs - 1 < seq:
            continue
        for drop in (True, False):
            for extra in (1, 0):
                a = cpp.build_sample_idx_int32(sizes, doc_idx, seq, epochs, tokens, drop, extra)
                b = npy.build_sample_idx_int32(sizes, doc_idx, seq, epochs, tokens, drop, extra)
                np.testing.assert_array_equal(a, b, err_msg=f"trial {trial} drop {drop} extra {extra}")
    for weights, size in (([0.5, 0.3, 0.2], 97), ([0.1, 0.9], 40), ([1.0], 5)):
        out = []
        for mod in (cpp, npy):
            di, dsi = np.zeros(size, np.int16), np.zeros(size, np.int64)
            mod.build_blending_indices(di, dsi, np.array(weights), len(weights), size, False)
            out.append((di, dsi))
        np.testing.assert_array_equal(out[0][0], out[1][0])
        np.testing.assert_array_equal(out[0][1], out[1][1])
    sizes = np.array([5, 2, 7, 3], np.int64)  # (zero sizes crash the C++)
    out = []
    for mod in (cpp, npy):
        di, dsi = np.zeros(sizes.sum(), np.int16), np.zeros(sizes.sum(), np.int64)
        mod.build_exhaustive_blending_indices(di, dsi, sizes, len(sizes))
        out.append((di, dsi))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


def _write_prefix(path, docs):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    b = IndexedDatasetBuilder(path + ".bin", dtype=np.uint16)
    for d in docs:
        b.add_document(torch.tensor(d, dtype=torch.int64), [len(d)])
    b.finalize(path + ".idx")
    return path


def test_gpt_dataset_blend_split_and_order(tmp_path, mp1):
    rng = np.random.RandomState(1)
    a = _write_prefix(str(tmp_path / "a"), [rng.randint(3, 100, rng.randint(20, 80)).tolist()
                                            for _ in range(60)])
    b = _write_prefix(str(tmp_path / "b"), [rng.randint(100, 200, rng.randint(20, 80)).tolist()
                                            for _ in range(60)])
    train, valid = P.build_pretrain_datasets([a, b], [0.75, 0.25], None, None, seq_len=32,
                                             seed=5, num_samples=(400, 40), vocab_size=512,
                                             eod=2, split="90,10,0",
                                             cache_dir=str(tmp_path / "cache"))
    assert len(train) >= 400 and valid is not None and len(valid) >= 40
    s = train[0]
    assert s["tokens"].shape == (32,) and torch.equal(s["tokens"][1:], s["labels"][:-1])
    from_a = sum(int(train[i]["tokens"].max() < 100) for i in range(400))
    assert 250 < from_a < 350  # ~75% of the samples come from prefix a
    # separate validation blend instead of a split; deterministic across builds (cache)
    t2, v2 = P.build_pretrain_datasets([a], None, [b], None, 32, 5, (50, 10), 512, 2,
                                       cache_dir=str(tmp_path / "cache"))
    t3, _ = P.build_pretrain_datasets([a], None, [b], None, 32, 5, (50, 10), 512, 2,
                                      cache_dir=str(tmp_path / "cache2"))
    assert int(v2[0]["tokens"].min()) >= 100
    assert all(torch.equal(t2[i]["tokens"], t3[i]["tokens"]) for i in range(50))


def test_split_without_validation_documents(tmp_path, mp1):
    """20 documents x 1% rounds to no validation document: megatron-core would loop forever
    on that split; we train without validation and say so."""
    rng = np.random.RandomState(4)
    a = _write_prefix(str(tmp_path / "small"), [rng.randint(3, 100, rng.randint(20, 80)).tolist()
                                                for _ in range(20)])
    notes = []
    train, valid = P.build_pretrain_datasets([a], None, None, None, 32, 5, (100, 20), 512, 2,
                                             "99,1,0", cache_dir=str(tmp_path / "c"),
                                             note=notes.append)
    assert len(train) >= 100 and valid is None
    assert notes and "no documents" in notes[0] and "VALID_DATASET_PATH" in notes[0]
    with pytest.raises(ValueError, match="training split"):
        P.build_pretrain_datasets([a], None, None, None, 32, 5, (100, 20), 512, 2, "0,1,0",
                                  cache_dir=str(tmp_path / "c"))


def test_numpy_fallback_builds_the_same_dataset(tmp_path, monkeypatch, mp1):
    """With the compiled helpers missing, the numpy fallback gives the same samples."""
    import sys
    _cpp()
    rng = np.random.RandomState(2)
    a = _write_prefix(str(tmp_path / "a"), [rng.randint(3, 500, rng.randint(5, 90)).tolist()
                                            for _ in range(40)])
    ref, _ = P.build_pretrain_datasets([a], None, None, None, 16, 3, (120, 0), 512, 2, "100,0,0",
                                       cache_dir=str(tmp_path / "c1"))
    import megatron.core.datasets as mcd
    fallback = P.numpy_helpers()
    monkeypatch.setitem(sys.modules, P.HELPERS_MODULE, fallback)
    monkeypatch.delitem(sys.modules, "megatron.core.datasets.helpers", raising=False)
    monkeypatch.delattr(mcd, "helpers", raising=False)
    monkeypatch.delattr(mcd, "helpers_cpp", raising=False)
    assert P.ensure_dataset_helpers() == "numpy"
    got, _ = P.build_pretrain_datasets([a], None, None, None, 16, 3, (120, 0), 512, 2, "100,0,0",
                                       cache_dir=str(tmp_path / "c2"))
    from megatron.core.datasets import helpers
    assert helpers.build_sample_idx_int32 is fallback.build_sample_idx_int32
    assert len(got) == len(ref)
    assert all(torch.equal(got[i]["tokens"], ref[i]["tokens"]) for i in range(len(ref)))
    monkeypatch.undo()
    sys.modules.pop("megatron.core.datasets.helpers", None)
    if hasattr(mcd, "helpers"):
        del mcd.helpers


def test_micro_batch_order_is_layout_independent_and_resumable():
    from megatron_patch.training.batches import MicroBatches
    ds = [{"tokens": torch.tensor([i]), "labels": torch.tensor([i]),
           "loss_mask": torch.ones(1), "position_ids": torch.zeros(1, dtype=torch.long)}
          for i in range(100)]
    ident = lambda x: x  # noqa: E731

    def take(dp, rank, consumed, n):
        it = MicroBatches(ds, ident, 8, 2, dp, rank, consumed)
        return [next(it)["tokens"].view(-1).tolist() for _ in range(n)]
    one = sum(take(1, 0, 0, 8), [])
    assert one == list(range(16))
    two = [take(2, r, 0, 4) for r in range(2)]
    # per global batch, DP ranks together hold exactly the same samples
    for step in range(2):
        got = sorted(sum(two[0][2 * step:2 * step + 2] + two[1][2 * step:2 * step + 2], []))
        assert got == list(range(8 * step, 8 * step + 8))
    assert sum(take(1, 0, 8, 4), []) == list(range(8, 16))  # resume after one step


def test_sft_loss_only_on_answer_tokens(mp1):
    """A hand-built SFT batch: the loss equals cross-entropy over the answer positions only,
    computed here from the model's logits; prompt targets do not change it."""
    from megatron_patch.models.llama.config import ParallelSettings, transformer_config
    from megatron_patch.models.llama.provider import build_llama
    from megatron_patch.training.batches import collate, sft_sample
    from megatron_patch.training.forward_step import forward_step
    from llama_fixtures import small_arch

    arch = small_arch(vocab_size=300)
    torch.manual_seed(0)
    model = build_llama(arch, transformer_config(arch, ParallelSettings(), "fp32")).eval()
    g = torch.Generator().manual_seed(3)
    seq = 24
    items = []
    for prompt_len, answer_len in ((10, 6), (4, 15)):
        ids = torch.randint(0, arch.vocab_size, (seq,), generator=g)
        labels = torch.full((seq,), -100)
        # labels[t] = target of position t = ids[t+1] on answer tokens (SFTDataset convention)
        labels[prompt_len - 1:prompt_len - 1 + answer_len] = \
            ids[prompt_len:prompt_len + answer_len]
        items.append({"input_ids": ids, "labels": labels})
    batch = collate([sft_sample(x) for x in items])
    assert torch.equal(batch["loss_mask"].bool(), torch.stack([x["labels"] for x in items]) != -100)

    def loss_of(b):  # the per-token contract: (sum over answer tokens, their count, report)
        output, loss_fn = forward_step(iter([b]), model)
        total, count, report = loss_fn(output)
        assert int(count) == int(b["loss_mask"].sum())
        assert torch.equal(report["lm loss"], torch.stack([total, count.float()]))
        return (total / count).item()

    with torch.no_grad():
        got = loss_of(batch)
        logits = model(batch["tokens"], batch["position_ids"], None)[..., :arch.vocab_size]
    labels = torch.stack([x["labels"] for x in items])
    ref = F.cross_entropy(logits.reshape(-1, arch.vocab_size).double(),
                          labels.reshape(-1), ignore_index=-100).item()
    assert abs(got - ref) < 1e-5, (got, ref)
    # prompt positions: whatever id is there as a target, the loss does not move
    other = {k: v.clone() for k, v in batch.items()}
    other["labels"][batch["loss_mask"] == 0] = 7
    with torch.no_grad():
        assert loss_of(other) == got
        # an answer target does move it
        flip = {k: v.clone() for k, v in batch.items()}
        pos = batch["loss_mask"][0].nonzero()[0, 0]
        flip["labels"][0, pos] = (flip["labels"][0, pos] + 1) % arch.vocab_size
        assert abs(loss_of(flip) - got) > 1e-4
