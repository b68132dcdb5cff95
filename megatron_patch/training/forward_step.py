"""forward_step / loss for megatron-core's pipeline schedules (get_forward_backward_func)."""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_patch.training import packed_seq


def masked_lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of the per-token losses where loss_mask is 1, and the number of such tokens:
    megatron-core's per-token loss contract. With ``calculate_per_token_loss`` the schedule
    adds the counts over micro-batches and ``finalize_model_grads`` divides the gradients by
    the count summed over DP x CP, so a step's gradient is that of the mean over every loss
    token of the global batch. Under context parallelism each rank holds part of every
    sequence (and a different number of SFT answer tokens): only the global count gives
    the same loss on every layout.

    ``lm loss`` reports [sum, count]; ``reported_loss`` turns a step's reports into the
    global mean."""
    mask = loss_mask.float().view(-1)
    loss = torch.sum(output_tensor.float().view(-1) * mask)
    count = mask.sum()
    return loss, count.detach().to(torch.int), \
        {"lm loss": torch.stack([loss.detach(), count.detach()])}


def reported_loss(losses: list) -> Optional[torch.Tensor]:
    """The mean loss over all loss tokens of a step (or evaluation batch) on every rank of
    the DP x CP group, from the micro-batch reports of ``masked_lm_loss``; None where the
    schedule returned none (pipeline stages before the last)."""
    if not losses:
        return None
    total = torch.stack([x["lm loss"].float().view(2) for x in losses]).sum(dim=0)
    torch.distributed.all_reduce(
        total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return total[0] / total[1].clamp(min=1.0)


def forward_step(data_iterator, model):
    """One micro-batch. Batches are dicts: tokens, labels, loss_mask, position_ids [b, s]
    (packed SFT: also cu_seqlens/max_seqlen, run as one THD sequence). With context
    parallelism each rank keeps its two of the 2 x CP sequence chunks (megatron's
    load-balanced layout, the one ContextParallelAttention and the rotary embedding assume)."""
    batch = next(data_iterator) if data_iterator is not None else None
    dev = next(model.parameters()).device
    packed_seq_params = None
    if batch is None:  # middle pipeline stages get activations from p2p, not data
        tokens = position_ids = labels = loss_mask = None
    else:
        if "cu_seqlens" in batch:
            if parallel_state.get_context_parallel_world_size() > 1:
                raise ValueError("packed SFT samples cannot be split over context-parallel "
                                 "ranks (MP_SFT_PACKING with CP>1)")
            batch, packed_seq_params = packed_seq.to_thd(dict(batch), dev)
        else:
            batch = get_batch_on_this_cp_rank(dict(batch))
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        tokens, labels = batch["tokens"], batch["labels"]
        loss_mask, position_ids = batch["loss_mask"], batch["position_ids"]
    output = model(tokens, position_ids, None, labels=labels,
                   packed_seq_params=packed_seq_params)
    return output, partial(masked_lm_loss, loss_mask)
