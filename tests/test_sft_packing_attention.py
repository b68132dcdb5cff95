"""Packed SFT in megatron-core's THD format (PackedSeqParams): every packed sample's logits
and per-token losses equal those of the sample run alone (transformers and our own model
as references), rotary positions restart per sample, BATCH_SIZE > 1 rows pack into one
sequence, nothing of size [s, s] is ever allocated, and grouped-query SDPA without K/V
copies equals the repeated-heads reference."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama_fixtures import hf_model, small_arch
from megatron_patch.models.llama import mapping
from megatron_patch.models.llama.config import transformer_config
from megatron_patch.models.llama.provider import build_llama
from megatron_patch.training import packed_seq
from megatron_patch.training.batches import collate
from megatron_patch.training.forward_step import forward_step


def _models(arch):
    hf = hf_model(arch)
    model = build_llama(arch, transformer_config(arch)).eval()
    model.load_state_dict(mapping.to_local_names(mapping.hf_to_mcore_state(hf.state_dict(), arch)))
    return hf, model


def _row(samples, seq_len):
    """A packed row the way SFTDataset builds one (tokens, labels, loss mask, boundaries)."""
    from megatron_patch.data.sft_dataset import pack_boundaries
    tokens = torch.cat(samples)
    pad = seq_len - tokens.numel()
    labels = torch.cat([torch.cat([s[1:], s[:1]]) for s in samples])
    mask = torch.cat([torch.cat([torch.ones(len(s) - 1), torch.zeros(1)]) for s in samples])
    row = {"tokens": torch.cat([tokens, torch.zeros(pad, dtype=torch.long)]),
           "labels": torch.cat([labels, torch.zeros(pad, dtype=torch.long)]),
           "loss_mask": torch.cat([mask, torch.zeros(pad)])}
    row.update(pack_boundaries([len(s) for s in samples], seq_len))
    return row


def test_packed_rows_equal_each_sample_alone(mp1):
    arch = small_arch()  # 4 heads, 2 KV groups: grouped-query attention
    hf, model = _models(arch)
    g = torch.Generator().manual_seed(5)
    lens = [[23, 17, 9], [31, 20]]  # two rows (BATCH_SIZE=2), padding after each
    rows_samples = [[torch.randint(0, arch.vocab_size, (n,), generator=g) for n in r] for r in lens]
    seq_len = 64
    batch = collate([_row(r, seq_len) for r in rows_samples])
    assert batch["cu_seqlens"].tolist() == [0, 23, 40, 49, 64, 95, 115, 128]
    assert int(batch["max_seqlen"]) == 31  # the longest segment, not the packed length

    with torch.no_grad():
        flat, params = packed_seq.to_thd(dict(batch), torch.device("cpu"))
        logits = model(flat["tokens"], flat["position_ids"], None, packed_seq_params=params)
        per_token, _ = forward_step(iter([batch]), model)
    assert logits.shape[:2] == (1, 2 * seq_len) and per_token.shape == (1, 2 * seq_len)
    for r, samples in enumerate(rows_samples):
        start = r * seq_len
        for s in samples:
            n = s.numel()
            got = logits[0, start:start + n, :arch.vocab_size]
            with torch.no_grad():
                ref_hf = hf(s[None]).logits[0]
                alone = model(s[None], torch.arange(n)[None], None)[0, :, :arch.vocab_size]
                alone_loss = model(s[None], torch.arange(n)[None], None,
                                   labels=torch.cat([s[1:], s[:1]])[None])[0]
            torch.testing.assert_close(got, ref_hf, atol=1e-4, rtol=0)
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(per_token[0, start:start + n], alone_loss, atol=1e-5,
                                       rtol=0)
            start += n

    # the same tokens without boundaries: later samples see earlier ones and differ
    with torch.no_grad():
        naive = model(flat["tokens"][:, :seq_len], torch.arange(seq_len)[None], None)
    assert (naive[0, 23:40] - logits[0, 23:40]).abs().max() > 1e-3


def test_thd_rope_restarts_positions_per_sample(mp1):
    """megatron-core's THD rope (the path attention takes with packed_seq_params) rotates
    each segment from position 0 -- as long as max_seqlen is not the whole packed length,
    where it switches to running offsets (merge_rows reports the longest segment)."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    arch = small_arch()
    assert not arch.rope_scaling
    config = transformer_config(arch)
    rope = RotaryEmbedding(kv_channels=arch.head_dim, rotary_percent=1.0,
                           rotary_base=int(arch.rope_theta))
    cu = packed_seq.merge_rows([torch.tensor([0, 5, 12], dtype=torch.int32)], 12)
    assert int(cu["max_seqlen"]) == 7
    freqs = rope(int(cu["max_seqlen"]), packed_seq=True)
    t = torch.randn(12, 4, arch.head_dim, dtype=torch.float64)
    packed = apply_rotary_pos_emb(t, freqs.double(), config, cu_seqlens=cu["cu_seqlens"])
    for a, b in ((0, 5), (5, 12)):  # each segment alone, positions 0..len-1 (float64, by hand)
        pos = torch.arange(b - a, dtype=torch.float64)
        inv = 1.0 / (arch.rope_theta ** (torch.arange(0, arch.head_dim, 2,
                                                      dtype=torch.float64) / arch.head_dim))
        ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)[:, None, :]
        x = t[a:b]
        rot = torch.cat([-x[..., arch.head_dim // 2:], x[..., :arch.head_dim // 2]], -1)
        ref = x * ang.cos() + rot * ang.sin()
        torch.testing.assert_close(packed[a:b], ref, atol=1e-6, rtol=0)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("packed", [True, False])
def test_packed_attention_at_8192_allocates_nothing_quadratic(mp1, packed):
    """Forward and backward of one attention layer on an 8192-token packed row: the largest
    tensor any op produces stays O(s) with THD; the dense block-diagonal mask it replaced
    (the reference, still honoured by SDPAttention) is s x s."""
    from megatron_patch.transformer.sdpa_attention import SDPAttention
    from megatron.core.transformer.enums import AttnMaskType
    arch = small_arch()
    attn = SDPAttention(transformer_config(arch), 1, AttnMaskType.causal, "self")
    s, lens = 8192, [1000, 3000, 2500, 1692]
    q = torch.randn(s, 4, arch.head_dim, requires_grad=True)
    k = torch.randn(s, 2, arch.head_dim, requires_grad=True)
    v = torch.randn(s, 2, arch.head_dim, requires_grad=True)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    probe = _LargestTensor()
    with probe:
        if packed:
            from megatron.core.packed_seq_params import PackedSeqParams
            out = attn(q, k, v, None, packed_seq_params=PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=3000,
                max_seqlen_kv=3000))
        else:
            seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
            mask = ~((seg[:, None] == seg[None, :]) & torch.ones(s, s, dtype=torch.bool).tril())
            out = attn(q[:, None], k[:, None], v[:, None], mask[None, None])
        out.sum().backward()
    if packed:
        assert probe.largest <= 4 * s * arch.hidden_size, probe.largest
    else:
        assert probe.largest >= s * s


def test_gqa_without_copies_equals_float64_reference(mp1):
    """SDPAttention shares K/V heads with enable_gqa (no mask) and repeats them (with a
    mask): both equal attention written out in float64."""
    from megatron_patch.transformer.sdpa_attention import SDPAttention
    from megatron.core.transformer.enums import AttnMaskType
    arch = small_arch()
    attn = SDPAttention(transformer_config(arch), 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(0)
    s, b, d = 37, 2, arch.head_dim
    q, k, v = (torch.randn(s, b, h, d, generator=g) for h in (4, 2, 2))
    pad = torch.zeros(b, 1, s, s, dtype=torch.bool)
    pad[1, ..., 30:] = True  # the second sample's last keys are padding
    qd, kd, vd = (x.double().permute(1, 2, 0, 3) for x in (q, k, v))
    kd, vd = kd.repeat_interleave(2, 1), vd.repeat_interleave(2, 1)  # query heads 0,1 -> kv 0
    scores = qd @ kd.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for mask in (None, pad):
        keep = causal if mask is None else causal & ~mask
        ref = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ vd
        ref = ref.permute(2, 0, 1, 3).reshape(s, b, -1).float()
        out = attn(q, k, v, mask)
        rows = slice(None) if mask is None else slice(0, 30)  # fully padded rows: any value
        torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=0)


def test_packed_dataset_items_carry_boundaries(tmp_path):
    from megatron_patch.data.corpus import bundled_sft_path
    from megatron_patch.data.sft_dataset import SFTDataset
    from megatron_patch.tokenizer import write_llama3_tokenizer_dir

    tok = write_llama3_tokenizer_dir(str(tmp_path / "tok"))
    packed = SFTDataset(bundled_sft_path(), tok, 256, kind="raw", packing=True, verbose=False)
    plain = SFTDataset(bundled_sft_path(), tok, 256, kind="raw", packing=False, verbose=False)
    assert len(packed) < len(plain)
    multi = 0
    sample = 0
    for i in range(len(packed)):
        item = packed[i]
        cu, pos = item["cu_seqlens"].tolist(), item["position_ids"]
        assert cu[0] == 0 and cu[-1] == 256 and cu == sorted(set(cu))
        # positions restart exactly at the boundaries
        assert torch.nonzero(pos == 0).flatten().tolist() == cu[:-1]
        # each segment is the next plain sample's tokens (until the padding)
        for a, b in zip(cu[:-1], cu[1:]):
            if sample < len(plain) and b - a <= 256:
                ids = plain[sample]["input_ids"][: b - a]
                if torch.equal(item["input_ids"][a:b], ids):
                    sample += 1
        multi += int(len(cu) > 3)
    assert multi > 0  # some items really hold several samples
    assert sample == len(plain)  # every sample found, in order
