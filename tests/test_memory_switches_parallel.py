"""The memory switches across two gloo processes (fp32 unless said otherwise):

- TP=2 with the distributed optimizer: AC=offload + OPTIMIZER_OFFLOAD=static train like
  neither (losses and weights within 1e-6);
- TP=2 + SP and PP=2 (+ AC=offload): packed SFT in THD with BATCH_SIZE=2 trains like the
  dense block-diagonal mask (the pipeline exchanges [b x s, 1, h] activations); with PP=2
  each stage offloads its own first layer (the same bytes on both stages);
- DP=2, DO, bf16, half of the Adam state offloaded: resuming from the iteration-3
  checkpoint reproduces iterations 4-6 and the final weights bit for bit.
"""
from __future__ import annotations

import os

import pytest
import torch

from mp_utils import run_distributed
from test_memory_switches import (ITERS, assert_same, config, copy_checkpoint, summary,
                                  with_dense_attention)
from train_helpers import make_world

pytestmark = pytest.mark.slow  # multi-process


def _body(rank, world, root, out):
    import torch.distributed as dist

    from train_helpers import World
    from megatron_patch.training.loop import train
    w, res = World(root), {}

    def go(name, cfg, dense=False):
        fn = (lambda: train(cfg, log_to_file=False))
        run = with_dense_attention(fn) if dense else fn()
        res[name] = summary(run)
        off = run.activation_offload
        res[name]["offloaded"] = None if off is None else off.packed_bytes
        return run

    p = lambda name: os.path.join(out, name)  # noqa: E731
    sft = dict(sft=True, mbs=2, iters=ITERS)
    go("tp2", config(w, p("tp2"), tp=2, do="true"))
    go("tp2_switches", config(w, p("tp2_sw"), tp=2, ac="offload", offload="static"))
    packing = {"MP_SFT_PACKING": "true"}
    sp = dict(tp=2, env=dict(packing))
    for name, dense in (("tp2_sp_thd", False), ("tp2_sp_dense", True)):
        cfg = config(w, p(name), **sft, **sp).replace(parallel={"sequence_parallel": True})
        go(name, cfg, dense=dense)
    go("pp2_thd_ac", config(w, p("pp2_thd"), ac="offload", **sft, env=packing).replace(
        parallel={"pp": 2}))
    go("pp2_dense", config(w, p("pp2_dense"), **sft, env=packing).replace(
        parallel={"pp": 2}), dense=True)

    half = {"MP_OFFLOAD_FRACTION": "0.5"}
    bf16 = dict(offload="static", iters=6, save=3, env=half)
    full = go("dp2_full", config(w, p("dp2_full"), **bf16).replace(precision={"dtype": "bf16"}))
    cfg = config(w, p("dp2_resumed"), **bf16).replace(precision={"dtype": "bf16"})
    if rank == 0:
        copy_checkpoint(full.cfg.checkpoint_dir, cfg.checkpoint_dir, 3)
    dist.barrier()
    go("dp2_resumed", cfg)
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    world = make_world(str(tmp_path_factory.getbasetemp() / "train_world"))
    out = str(tmp_path_factory.mktemp("memory_switches_2p"))
    return run_distributed(_body, 2, world.root, out, timeout=900)


def test_tp2_offload_switches_train_like_neither(results):
    for r in results:
        assert_same(r["tp2_switches"], r["tp2"], what="TP=2 AC=offload + OPTIMIZER_OFFLOAD")
        assert r["tp2_switches"]["offloaded"] > 0


@pytest.mark.parametrize("name,ref", [("tp2_sp_thd", "tp2_sp_dense"),
                                      ("pp2_thd_ac", "pp2_dense")])
def test_packed_sft_thd_in_parallel_layouts(results, name, ref):
    for r in results:
        # tolerances: test_memory_switches.test_packed_sft_thd_trains_like_the_dense_mask
        assert_same(r[name], r[ref], tol=2e-6, weight_tol=1e-5, what=name)


def test_each_pipeline_stage_offloads_its_first_layer(results):
    first, second = (r["pp2_thd_ac"]["offloaded"] for r in results)
    assert first == second > 0  # one identical layer per stage, same micro-batches


def test_bf16_half_offloaded_dp2_resume_is_bit_identical(results):
    for r in results:
        full, resumed = r["dp2_full"], r["dp2_resumed"]
        assert len(resumed["losses"]) == 3 and resumed["losses"] == full["losses"][3:]
        for k, v in full["weights"].items():
            assert torch.equal(resumed["weights"][k], v), k
