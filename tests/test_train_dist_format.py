"""Training checkpoints in megatron-core's torch_dist format (MP_CKPT_FORMAT=torch_dist), 2
gloo processes, fp32:

- the format does not change training: a torch_dist run's losses equal the per-rank
  (torch) run's bit for bit;
- a resume from its iteration-2 checkpoint in the same layout (TP=2) continues bit for bit
  (model, Adam state, scheduler, RNG, counters);
- the same checkpoint resumed at TP=1 x DP=2 (MP_RESUME_FROM; dist_checkpointing re-shards
  weights and Adam state natively) continues like an uninterrupted TP=1 x DP=2 run.
"""
from __future__ import annotations

import os

import pytest
import torch

from mp_utils import run_distributed
from test_train_parallel import _cfg, _weights

pytestmark = pytest.mark.slow

DIST = {"MP_CKPT_FORMAT": "torch_dist"}


def _runs(rank, world, root, out):
    import shutil

    import torch.distributed as dist

    from train_helpers import World
    from megatron_patch import checkpoint as ck
    from megatron_patch.training.loop import train
    w = World(root)

    def losses(run):
        return [h["loss"] for h in run.history]

    res = {}
    a = train(_cfg(w, os.path.join(out, "torch"), tp=2, iters=4, save=2), log_to_file=False)
    b = train(_cfg(w, os.path.join(out, "dist"), tp=2, iters=4, save=2, env=DIST),
              log_to_file=False)
    res["torch"], res["dist"] = losses(a), losses(b)
    res["format"] = ck.find_checkpoint(b.cfg.checkpoint_dir).format
    # same layout: continue from iteration 2 in a fresh output directory
    c_cfg = _cfg(w, os.path.join(out, "dist_resumed"), tp=2, iters=4, save=2, env=DIST)
    if rank == 0:
        os.makedirs(c_cfg.checkpoint_dir)
        shutil.copytree(os.path.join(b.cfg.checkpoint_dir, "iter_0000002"),
                        os.path.join(c_cfg.checkpoint_dir, "iter_0000002"))
        ck.write_tracker(c_cfg.checkpoint_dir, 2)
    dist.barrier()
    c = train(c_cfg, log_to_file=False)
    res["resumed_iters"] = [h["iteration"] for h in c.history]
    res["resumed"] = losses(c)
    wb, wc = _weights(b), _weights(c)
    res["same_weights"] = sorted(wb) == sorted(wc) and all(torch.equal(wb[k], wc[k])
                                                          for k in wb)
    # another layout: TP=1 x DP=2 from the TP=2 checkpoint, against an uninterrupted run
    e = train(_cfg(w, os.path.join(out, "tp1"), iters=4, save=100), log_to_file=False)
    d = train(_cfg(w, os.path.join(out, "tp1_from_dist"), iters=4, save=100,
                   env=dict(DIST, MP_RESUME_FROM=os.path.join(b.cfg.checkpoint_dir,
                                                              "iter_0000002"))),
              log_to_file=False)
    res["tp1"], res["tp1_resumed"] = losses(e), losses(d)
    res["tp1_resumed_iters"] = [h["iteration"] for h in d.history]
    return res


@pytest.fixture(scope="module")
def results(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist_format"))
    return run_distributed(_runs, 2, world.root, out, timeout=900)[1]


def test_format_does_not_change_training(results):
    assert results["format"] == "torch_dist"
    assert results["dist"] == results["torch"]


def test_same_layout_resume_is_bit_exact(results):
    assert results["resumed_iters"] == [3, 4]
    assert results["resumed"] == results["dist"][2:]
    assert results["same_weights"]


def test_resume_in_another_layout(results):
    assert results["tp1_resumed_iters"] == [3, 4]
    for got, want in zip(results["tp1_resumed"], results["tp1"][2:]):
        assert abs(got - want) <= 1e-5 * abs(want), (results["tp1_resumed"], results["tp1"])
    # and the resume really continued (iteration 3 of a fresh TP=1 run is different)
    assert results["tp1"][0] != pytest.approx(results["tp1"][2], rel=1e-3)
