"""The loss ignores the vocabulary padding on every TP rank's shard of the logits.

With vocab 1000 padded to 1024 at TP=2, rank 0 holds logits of tokens 0-511 (no padding)
and rank 1 of tokens 512-1023, of which 1000-1023 are padding: rank 1 must mask exactly its
last 24 columns, rank 0 none. Each rank is played in one process by giving megatron-core's
TP-rank lookups that rank (the TP group has one member, so megatron's vocab-parallel cross
entropy reduces over this shard alone); the expected per-token loss is float64
logsumexp over the shard's real-token columns minus the target's logit. The end-to-end
TP=2 losses against transformers are in test_distributed_equivalence.py.
"""
from __future__ import annotations

import pytest
import torch

from megatron_patch.conversion.synthetic import small_arch

VOCAB, TP, SHARD = 1000, 2, 512


def _model():
    from megatron_patch.models.llama.config import transformer_config
    from megatron_patch.models.llama.provider import build_llama
    arch = small_arch("llama3", vocab_size=VOCAB)
    assert arch.padded_vocab_size(TP) == TP * SHARD
    return build_llama(arch, transformer_config(arch))


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_padded_columns_masked_per_rank(mp1, monkeypatch, tp_rank):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import cross_entropy
    model = _model()
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: tp_rank)
    monkeypatch.setattr(cross_entropy, "get_tensor_model_parallel_rank", lambda: tp_rank)
    start = tp_rank * SHARD
    real = min(SHARD, VOCAB - start)          # this shard's real-token columns
    assert real == (SHARD if tp_rank == 0 else VOCAB - SHARD)
    g = torch.Generator().manual_seed(tp_rank)
    s, b = 6, 2
    logits = 3 * torch.randn(s, b, SHARD, generator=g)
    logits[..., real:] = 5.0  # large padded logits: any leak into the softmax shows
    labels = start + torch.randint(0, real, (b, s), generator=g)  # targets in this shard
    loss = model.compute_language_model_loss(labels, logits.clone())  # [b, s]
    x = logits.double()[..., :real]
    target = x.gather(-1, (labels.t() - start).unsqueeze(-1)).squeeze(-1)
    want = (torch.logsumexp(x, dim=-1) - target).t()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
