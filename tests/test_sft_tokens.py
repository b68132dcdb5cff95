"""SFT tokens/s counts the samples' tokens, not the padding (issue 16, item 12): the count of
a global batch from the datasets' lengths equals the non-padding positions of the very
items the trainer gets, and the trainer's logged tokens/s times the step time is that
count. The reference pads with an id no tokenizer produces, so padding is unmistakable."""
from __future__ import annotations

import pytest


PAD = -7  # an id no tokenizer produces: every position holding it is padding


def _padding_free_count(stream, start, count):
    """The reference: non-PAD input positions of the items themselves."""
    return sum(int((stream[k]["input_ids"] != PAD).sum()) for k in range(start, start + count))


@pytest.mark.parametrize("packing", [False, True])
def test_real_tokens_match_the_items(world, packing):
    from megatron_patch.data.sft_dataset import SFTDataset
    from megatron_patch.training.batches import CyclicShuffled, real_tokens
    seq = 96
    ds = SFTDataset(world.sft_json, world.tokenizer, seq, "raw", "llama2", packing,
                    verbose=False)
    ds.pad_id = PAD
    stream = CyclicShuffled(ds, seed=3)
    n = len(ds)
    for start, count in ((0, 4), (5, 8), (n - 2, 6)):  # the last crosses an epoch
        got = real_tokens(stream, start, count, seq)
        assert got == _padding_free_count(stream, start, count)
        assert got < count * seq  # the samples are shorter than seq: padding was there
    # pretraining samples carry no padding: every position counts
    assert real_tokens(list(range(10)), 2, 4, seq) == 4 * seq


def test_sft_log_counts_real_tokens(world, tmp_path, mp1):
    """Two SFT iterations in this process: tokens/s x step time = the reference count of
    each iteration's global batch (not GBS x PAD_LEN)."""
    from megatron_patch.data.sft_dataset import SFTDataset
    from megatron_patch.training.arguments import build_config
    from megatron_patch.training.batches import CyclicShuffled
    from megatron_patch.training.loop import train
    gbs, pad_len = 4, 96
    args = ["dsw", "auto", 2, gbs, "1e-4", "0", pad_len, pad_len, "fp32", 1, 1, 1, "false",
            "false", "false", "true", "false", "false", 100, world.sft_json, "none",
            world.release, 2, 0, str(tmp_path / "out")]
    cfg = build_config([str(a) for a in args], "llama2",
                       env={"MP_DATASET_TYPE": "raw", "MP_EVAL_ITERS": "0"})
    run = train(cfg, log_to_file=False)
    ds = SFTDataset(world.sft_json, world.tokenizer, pad_len, "raw", "llama2", False,
                    verbose=False)
    ds.pad_id = PAD
    stream = CyclicShuffled(ds, cfg.seed)
    assert len(run.history) == 2
    for i, rec in enumerate(run.history):
        want = _padding_free_count(stream, i * gbs, gbs)
        assert want < gbs * pad_len
        assert rec["tokens_per_s"] * rec["ms"] / 1000 == pytest.approx(want, rel=1e-9)
