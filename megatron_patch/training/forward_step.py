"""forward_step / loss for megatron-core's pipeline schedules (get_forward_backward_func)."""
from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state

from megatron_patch.training import packed_seq


def masked_lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean per-token loss over tokens where loss_mask is 1 (megatron's loss_func shape).

    The reported value is averaged over the data-parallel group so every rank logs the same.
    """
    losses = output_tensor.float()
    mask = loss_mask.float().view(-1)
    n = mask.sum().clamp(min=1.0)
    loss = torch.sum(losses.view(-1) * mask) / n
    reported = loss.detach().clone()
    torch.distributed.all_reduce(reported, group=parallel_state.get_data_parallel_group())
    reported /= parallel_state.get_data_parallel_world_size()
    return loss, {"lm loss": reported}


def forward_step(data_iterator, model):
    """One micro-batch. Batches are dicts: tokens, labels, loss_mask, position_ids [b, s]
    (packed SFT: also cu_seqlens/max_seqlen, run as one THD sequence)."""
    batch = next(data_iterator) if data_iterator is not None else None
    dev = next(model.parameters()).device
    packed_seq_params = None
    if batch is None:  # middle pipeline stages get activations from p2p, not data
        tokens = position_ids = labels = loss_mask = None
    else:
        if "cu_seqlens" in batch:
            batch, packed_seq_params = packed_seq.to_thd(dict(batch), dev)
        else:
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        tokens, labels = batch["tokens"], batch["labels"]
        loss_mask, position_ids = batch["loss_mask"], batch["position_ids"]
    output = model(tokens, position_ids, None, labels=labels,
                   packed_seq_params=packed_seq_params)
    return output, partial(masked_lm_loss, loss_mask)
