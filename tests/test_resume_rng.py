"""Resume restores every RNG stream and the LR scheduler of each data-parallel rank.

Training draws no random numbers today (dropout 0, data order from the seed), so a resume
that forgot the RNG state would still give the same losses. Here every micro-batch draws
from each stream -- python ``random``, numpy, torch, and megatron's tensor-parallel RNG
tracker (``get_cuda_rng_tracker().fork()``, dropout's stream) -- as dropout or random
masking would, and DP rank r draws r+1 times, so the two ranks' streams differ and the
per-DP-rank list in the rank file matters. 2 gloo processes (DP=2, distributed optimizer),
fp32, the tiny model of train_helpers:

- uninterrupted: 4 iterations, checkpoint at 2 (each stream's raw state captured as it is
  saved);
- resumed: the same run restarted from a copy of checkpoint 2. Right after setup each raw
  stream state equals the one saved by that DP rank, the scheduler is at 2 x GBS samples
  with the same LR; iterations 3-4 draw exactly the uninterrupted run's numbers per rank and
  end with the same scheduler step count and LR;
- the same restart with RNG restoring disabled draws other numbers: the check can fail.
"""
from __future__ import annotations

import os

import pytest

from mp_utils import run_distributed

pytestmark = pytest.mark.slow  # multi-process

GBS, SEQ = 4, 64


def _cfg(w, out, iters, save):
    from megatron_patch.training.arguments import build_config
    args = ["dsw", "auto", 1, GBS, "1e-3", "1e-4", SEQ, SEQ, "fp32", 1, 1, 1, "false", "true",
            "true", "false", "false", "false", save, w.corpus, w.corpus, w.release,
            iters * GBS * SEQ, GBS * SEQ, out]
    return build_config([str(a) for a in args], "llama2", env={}).replace(eval_iters=0)


def _raw_states() -> dict:
    """Each stream's state as the libraries give it (not through checkpointing.rng_state)."""
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (keys.tolist(), int(pos), int(has_gauss), float(cached)),
            "torch": torch.get_rng_state().tolist(),
            "tracker": {k: v.tolist() for k, v in
                        tensor_parallel.get_cuda_rng_tracker().get_states().items()}}


def _draw() -> dict:
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel
    with tensor_parallel.get_cuda_rng_tracker().fork():  # dropout's stream in megatron
        tracker = float(torch.rand(1))
    return {"python": random.random(), "numpy": float(np.random.rand()),
            "torch": float(torch.rand(1)), "tracker": tracker}


def _runs(rank, world, root, out):
    import shutil

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import megatron_patch.training.forward_step as fs
    from megatron_patch import checkpoint as ck
    from megatron_patch.training import checkpointing, loop
    from train_helpers import World
    w = World(root)
    draws, marks = [], {}
    orig_forward, orig_save, orig_setup = fs.forward_step, checkpointing.save_checkpoint, \
        loop.setup

    def forward(data_iterator, model):  # random numbers as dropout / masking would use
        for _ in range(ps.get_data_parallel_rank() + 1):
            draws.append(_draw())
        return orig_forward(data_iterator, model)

    def save(run, iteration):
        marks.setdefault("saved", {})[iteration] = {
            "rng": _raw_states(), "num_steps": run.scheduler.num_steps,
            "lr": run.optimizer.param_groups[0]["lr"]}
        return orig_save(run, iteration)

    def setup(cfg, log=print):
        run = orig_setup(cfg, log=log)
        marks["after_setup"] = {"rng": _raw_states(), "iteration": run.iteration,
                                "num_steps": run.scheduler.num_steps,
                                "lr": run.optimizer.param_groups[0]["lr"]}
        return run

    def train(cfg):
        draws.clear()
        marks.clear()
        run = loop.train(cfg, log_to_file=False)
        return {"draws": list(draws), "marks": dict(marks),
                "end": {"num_steps": run.scheduler.num_steps,
                        "lr": run.optimizer.param_groups[0]["lr"],
                        "iterations": [h["iteration"] for h in run.history],
                        "losses": [h["loss"] for h in run.history]}}

    def restart(name, src):
        cfg = _cfg(w, os.path.join(out, name), iters=4, save=2)
        if rank == 0:
            os.makedirs(cfg.checkpoint_dir)
            shutil.copytree(os.path.join(src, "iter_0000002"),
                            os.path.join(cfg.checkpoint_dir, "iter_0000002"))
            ck.write_tracker(cfg.checkpoint_dir, 2)
        dist.barrier()
        return train(cfg)

    fs.forward_step, checkpointing.save_checkpoint, loop.setup = forward, save, setup
    try:
        full_cfg = _cfg(w, os.path.join(out, "full"), iters=4, save=2)
        res = {"full": train(full_cfg)}
        src = full_cfg.checkpoint_dir
        state = ck.load_rank_file(os.path.join(src, "iter_0000002", "mp_rank_00",
                                               "model_optim_rng.pt"), mmap=False)
        res["saved_rng_entries"] = len(state["rng_state"])
        res["saved_rng_differ"] = (state["rng_state"][0]["torch_rng_state"].tolist()
                                   != state["rng_state"][-1]["torch_rng_state"].tolist())
        res["resumed"] = restart("resumed", src)
        real_set = checkpointing.set_rng_state
        checkpointing.set_rng_state = lambda state: None  # the mutant: RNG not restored
        try:
            res["no_restore"] = restart("no_restore", src)
        finally:
            checkpointing.set_rng_state = real_set
    finally:
        fs.forward_step, checkpointing.save_checkpoint, loop.setup = orig_forward, orig_save, \
            orig_setup
    res["dp_rank"] = ps.get_data_parallel_rank()
    return res


@pytest.fixture(scope="module")
def ranks(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rng_runs"))
    return run_distributed(_runs, 2, world.root, out, timeout=600)


MICRO = GBS // 2  # micro-batches per iteration and DP rank (MBS 1, DP 2)


def test_rank_file_holds_one_rng_state_per_dp_rank(ranks):
    assert sorted(r["dp_rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["saved_rng_entries"] == 2
        assert r["saved_rng_differ"]  # the ranks drew differently: the index matters


def test_streams_restored_right_after_setup(ranks):
    for r in ranks:
        saved = r["full"]["marks"]["saved"][2]
        after = r["resumed"]["marks"]["after_setup"]
        assert after["iteration"] == 2
        for stream in ("python", "numpy", "torch", "tracker"):
            assert after["rng"][stream] == saved["rng"][stream], (r["dp_rank"], stream)
        assert after["num_steps"] == saved["num_steps"] == 2 * GBS
        assert after["lr"] == saved["lr"]


def test_resumed_draws_equal_uninterrupted_per_dp_rank(ranks):
    for r in ranks:
        per_iter = MICRO * (r["dp_rank"] + 1)
        full, resumed = r["full"]["draws"], r["resumed"]["draws"]
        assert len(full) == 4 * per_iter and len(resumed) == 2 * per_iter
        for stream in ("python", "numpy", "torch", "tracker"):
            assert [d[stream] for d in resumed] == [d[stream] for d in full[2 * per_iter:]], \
                (r["dp_rank"], stream)
        assert r["resumed"]["end"]["iterations"] == [3, 4]
        assert r["resumed"]["end"]["losses"] == r["full"]["end"]["losses"][2:]
        assert r["resumed"]["end"]["num_steps"] == r["full"]["end"]["num_steps"] == 4 * GBS
        assert r["resumed"]["end"]["lr"] == r["full"]["end"]["lr"]


def test_restart_without_rng_restore_draws_differently(ranks):
    """What the two tests above would see if resume skipped the RNG state: every stream's
    draws after the restart differ from the uninterrupted run's."""
    for r in ranks:
        per_iter = MICRO * (r["dp_rank"] + 1)
        full, bad = r["full"]["draws"][2 * per_iter:], r["no_restore"]["draws"]
        for stream in ("python", "numpy", "torch", "tracker"):
            assert [d[stream] for d in bad] != [d[stream] for d in full], (r["dp_rank"], stream)
        saved = r["full"]["marks"]["saved"][2]["rng"]
        assert r["no_restore"]["marks"]["after_setup"]["rng"]["torch"] != saved["torch"]
