"""The cpu backend's pipeline p2p under gloo.

1. megatron-core's P2PCommunicator hands GLOBAL ranks to the p2p functions. With TP2 x PP2
   (4 processes) the pipeline pairs are global ranks {0, 2} and {1, 3}: every stage must get
   exactly its peer's tensors (a rank mapped through the pipeline group a second time named a
   rank outside the group: "Group rank 2 is not part of group").
2. The direction tags are needed: with PP=2 "prev" and "next" are the same peer, and gloo
   matches messages per (peer, tag) in posting order. One rank posts a gradient (send_prev)
   and then an activation (send_next) in two calls while its peer posts both receives in one
   call (recv_prev first): without distinct tags the gradient lands in the activation buffer.
   The test shows that mix-up happens with equal tags and not with the backend's tags.
"""
from __future__ import annotations

import pytest
import torch

from mp_utils import run_distributed

pytestmark = pytest.mark.slow


def _exchange_tp2_pp2(rank, world):
    from megatron.core import ModelParallelConfig
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from megatron_patch import parallel
    parallel.initialize_model_parallel(tp=2, pp=2)
    config = ModelParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                 pipeline_dtype=torch.float32)
    comm = P2PCommunicator(ps.get_pipeline_model_parallel_group(), config)
    first = ps.is_pipeline_first_stage()
    shape = (3, 2)
    # forward: the first stage sends a tensor that names its global rank
    if first:
        comm.send_forward(torch.full(shape, 100.0 + rank), is_last_stage=False)
        grad = comm.recv_backward(shape, is_last_stage=False)
        return {"peer": (comm.prev_rank, comm.next_rank), "got": float(grad[0, 0])}
    act = comm.recv_forward(shape, is_first_stage=False)
    comm.send_backward(torch.full(shape, 200.0 + rank), is_first_stage=False)
    return {"peer": (comm.prev_rank, comm.next_rank), "got": float(act[0, 0])}


def test_tp2_pp2_stages_exchange_with_their_global_peers():
    res = run_distributed(_exchange_tp2_pp2, 4)
    # megatron's default order puts TP innermost: stage 0 = ranks 0,1; stage 1 = ranks 2,3
    assert res[0]["got"] == 202.0 and res[1]["got"] == 203.0  # gradients from 2 and 3
    assert res[2]["got"] == 100.0 and res[3]["got"] == 101.0  # activations from 0 and 1
    assert [r["peer"] for r in res] == [(2, 2), (3, 3), (0, 0), (1, 1)]


def _mixed_order(rank, world, same_tag):
    import torch.distributed as dist

    from megatron_patch.backends import cpu
    group = dist.new_group([0, 1])
    peer = 1 - rank
    if same_tag:  # the mutant: both directions on one tag
        saved = cpu._TAG_BWD
        cpu._TAG_BWD = cpu._TAG_FWD
    try:
        kw = dict(group=group, prev_pipeline_rank=peer, next_pipeline_rank=peer)
        none = dict(tensor_send_prev=None, tensor_recv_prev=None, tensor_send_next=None,
                    tensor_recv_next=None)
        if rank == 1:  # gradient first, then activation, in two separate calls
            grad, act = torch.full((4,), -1.0), torch.full((4,), 1.0)
            reqs = list(cpu._tagged_p2p(**{**none, "tensor_send_prev": grad}, **kw).values())
            reqs += list(cpu._tagged_p2p(**{**none, "tensor_send_next": act}, **kw).values())
            for r in reqs:
                r.wait()
            return None
        recv_act, recv_grad = torch.zeros(4), torch.zeros(4)
        reqs = cpu._tagged_p2p(**{**none, "tensor_recv_prev": recv_act,
                                  "tensor_recv_next": recv_grad}, **kw)
        for r in reqs.values():
            r.wait()
        return float(recv_act[0]), float(recv_grad[0])
    finally:
        if same_tag:
            cpu._TAG_BWD = saved


def test_direction_tags_keep_activations_and_gradients_apart():
    tagged = run_distributed(_mixed_order, 2, False)[0]
    assert tagged == (1.0, -1.0)           # activation and gradient where they belong
    untagged = run_distributed(_mixed_order, 2, True)[0]
    assert untagged == (-1.0, 1.0)         # one tag: the gradient arrives as the activation
