"""Packed SFT samples: per-sample positions + block-diagonal causal mask make each packed
sample's logits and loss equal those of the sample run alone."""
import torch

from llama_fixtures import hf_model, small_arch
from megatron_patch.models.llama import mapping
from megatron_patch.models.llama.config import transformer_config
from megatron_patch.models.llama.provider import build_llama
from megatron_patch.training.forward_step import forward_step, packed_attention_mask


def _model(arch):
    model = build_llama(arch, transformer_config(arch)).eval()
    model.load_state_dict(mapping.to_local_names(mapping.hf_to_mcore_state(hf_model(arch).state_dict(), arch)))
    return model


def test_packed_mask_shape_and_values():
    seg = torch.tensor([[0, 0, 1, 1, 2]])
    m = packed_attention_mask(seg)[0, 0]
    keep = ~m
    assert keep.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                             [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


def test_packed_samples_equal_separate_runs(mp1):
    arch = small_arch()
    model = _model(arch)
    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, arch.vocab_size, (23,), generator=g)
    b = torch.randint(0, arch.vocab_size, (17,), generator=g)
    tokens = torch.cat([a, b])[None]
    seg = torch.tensor([[0] * 23 + [1] * 17])
    pos = torch.cat([torch.arange(23), torch.arange(17)])[None]
    with torch.no_grad():
        packed = model(tokens, pos, packed_attention_mask(seg))
        alone_a = model(a[None], torch.arange(23)[None], None)
        alone_b = model(b[None], torch.arange(17)[None], None)
        naive = model(tokens, torch.arange(40)[None], None)  # no mask: b would see a
    torch.testing.assert_close(packed[:, :23], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[:, 23:], alone_b, atol=1e-5, rtol=0)
    assert (naive[:, 23:] - alone_b).abs().max() > 1e-3

    # through forward_step (the training path): per-token loss equals the separate runs'
    labels = torch.cat([a[1:], b[:1], b[1:], b[:1]])[None]
    batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(1, 40),
             "position_ids": pos, "segment_ids": seg}
    with torch.no_grad():
        out, _ = forward_step(iter([batch]), model)
        ref_b = model(b[None], torch.arange(17)[None], None, labels=torch.cat([b[1:], b[:1]])[None])
    torch.testing.assert_close(out[:, 23:], ref_b, atol=1e-5, rtol=0)


def test_packed_dataset_items_carry_segments(tmp_path):
    from megatron_patch.data.corpus import bundled_sft_path
    from megatron_patch.data.sft_dataset import SFTDataset
    from megatron_patch.tokenizer import write_llama3_tokenizer_dir

    tok = write_llama3_tokenizer_dir(str(tmp_path / "tok"))
    packed = SFTDataset(bundled_sft_path(), tok, 256, kind="raw", packing=True, verbose=False)
    plain = SFTDataset(bundled_sft_path(), tok, 256, kind="raw", packing=False, verbose=False)
    assert len(packed) < len(plain)
    multi = 0
    for i in range(len(packed)):
        item = packed[i]
        seg, pos = item["segment_ids"], item["position_ids"]
        starts = torch.nonzero(pos == 0).flatten().tolist()
        changes = [0] + (torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1).tolist()
        # every sample restarts its positions exactly where its segment starts (padding
        # continues counting and has its own segment)
        assert set(starts) <= set(changes)
        multi += int(seg[: len(pos)].unique().numel() > 2)
    assert multi > 0  # some items really hold several samples
