"""Packed SFT micro-batches in megatron-core's THD format (PackedSeqParams).

A packed row holds several samples (data/sft_dataset.py: ``cu_seqlens`` per row). A
micro-batch of b rows becomes ONE sequence of b x s tokens -- megatron-core's THD layout,
where the batch dimension is 1 and ``cu_seqlens`` marks every sample of every row -- so
BATCH_SIZE > 1 packs too. Attention (transformer/sdpa_attention.py) and rotary embeddings
(megatron-core's THD path) then restart at each sample, with no [s, s] mask anywhere.
The pipeline schedules exchange [b x s, 1, hidden] activations accordingly.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def merge_rows(row_cu_seqlens: List[torch.Tensor], row_len: int) -> Dict[str, torch.Tensor]:
    """The rows' boundaries as one THD sequence: ``cu_seqlens`` (int32) and ``max_seqlen``
    (the longest segment -- megatron's rope takes positions 0..max_seqlen-1 per segment; an
    upper bound equal to the total length would switch it to running offsets)."""
    parts = [cu[:-1].to(torch.int64) + i * row_len for i, cu in enumerate(row_cu_seqlens)]
    cu = torch.cat(parts + [torch.tensor([len(row_cu_seqlens) * row_len])]).to(torch.int32)
    return {"cu_seqlens": cu, "max_seqlen": torch.diff(cu).max().reshape(())}


def to_thd(batch: Dict[str, torch.Tensor], device) -> Tuple[dict, PackedSeqParams]:
    """[b, s] tensors -> [1, b x s] on ``device``, and the PackedSeqParams of the batch."""
    cu = batch.pop("cu_seqlens").to(device=device, dtype=torch.int32)
    longest = int(batch.pop("max_seqlen"))
    flat = {k: v.reshape(1, -1).to(device, non_blocking=True) for k, v in batch.items()}
    return flat, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=longest, max_seqlen_kv=longest)


def schedule_shape(packed: bool, seq_len: int, micro_batch_size: int) -> Tuple[int, int]:
    """(seq_length, micro_batch_size) the pipeline schedules size their p2p buffers with."""
    return (seq_len * micro_batch_size, 1) if packed else (seq_len, micro_batch_size)
