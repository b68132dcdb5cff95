"""Crash and resume through the launcher, 2 gloo processes, distributed optimizer (DP=2):

A: 6 iterations, checkpoints at 3 and 6 (uninterrupted).
B: the same command in another output dir, SIGKILLed in the middle of saving iteration 6:
   the tracker still names 3, no iter_0000006 exists (only the staging dir), nothing looks
   complete that is not. Restarted with the same command it resumes from iteration 3 by
   itself; iterations 4-6 (losses from TensorBoard, float32 as logged) and the final
   weights and optimizer state equal A's bit for bit.
"""
from __future__ import annotations

import glob
import os

import pytest
import torch

from train_helpers import launcher_env, run_launcher, tb_scalars

pytestmark = pytest.mark.slow  # multi-process / end-to-end

GBS, SEQ = 4, 64


def _args(w, out):
    return ["dsw", "auto", 1, GBS, "1e-3", "1e-4", SEQ, SEQ, "fp32", 1, 1, 1, "false", "true",
            "true", "false", "false", "false", 3, w.corpus, w.corpus, w.release,
            6 * GBS * SEQ, GBS * SEQ, out]


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    a, b = str(base / "A"), str(base / "B")
    env = dict(MP_NPROC=2, MP_EVAL_ITERS=0)
    pa = run_launcher(_args(world, a), "llama3_1", env=launcher_env(**env), cwd=str(base))
    pb1 = run_launcher(_args(world, b), "llama3_1",
                       env=launcher_env(MP_TEST_KILL_IN_SAVE=6, **env), cwd=str(base))
    ck = glob.glob(os.path.join(b, "checkpoint", "*"))
    after_crash = None
    if len(ck) == 1:
        after_crash = {"tracker": open(os.path.join(ck[0], "latest_checkpointed_iteration.txt"))
                       .read().strip(), "entries": sorted(os.listdir(ck[0]))}
    pb2 = run_launcher(_args(world, b), "llama3_1", env=launcher_env(**env), cwd=str(base))
    return a, b, pa, pb1, after_crash, pb2


def _ckdir(out):
    (d,) = glob.glob(os.path.join(out, "checkpoint", "*"))
    return d


def test_uninterrupted_run(runs):
    a, _, pa, _, _, _ = runs
    assert pa.returncode == 0, pa.stdout[-3000:] + pa.stderr[-3000:]
    assert "DP=2" in pa.stdout and "distributed optimizer" in pa.stdout


def test_crash_mid_save_leaves_nothing_complete(runs):
    _, b, _, pb1, after_crash, _ = runs
    assert pb1.returncode != 0  # SIGKILLed
    assert after_crash is not None
    assert after_crash["tracker"] == "3"
    assert "iter_0000006" not in after_crash["entries"]
    assert ".staging.iter_0000006" in after_crash["entries"]


def test_restart_resumes_bit_identical(runs):
    a, b, pa, _, _, pb2 = runs
    assert pb2.returncode == 0, pb2.stdout[-3000:] + pb2.stderr[-3000:]
    assert "resuming from" in pb2.stdout and "iter_0000003" in pb2.stdout
    name = os.path.basename(_ckdir(a))
    tb_a = glob.glob(os.path.join(a, "tensorboard", name + "_*"))
    tb_b = sorted(glob.glob(os.path.join(b, "tensorboard", name + "_*")))
    la, lb = tb_scalars(tb_a[0]), tb_scalars(tb_b[-1])  # the restarted run's own TB dir
    assert sorted(lb) == [4, 5, 6], lb
    assert [lb[i] for i in (4, 5, 6)] == [la[i] for i in (4, 5, 6)], (la, lb)
    # final weights and the distributed optimizer's state
    da, db = _ckdir(a), _ckdir(b)
    assert open(os.path.join(db, "latest_checkpointed_iteration.txt")).read().strip() == "6"
    fa = os.path.join(da, "iter_0000006", "mp_rank_00")
    fb = os.path.join(db, "iter_0000006", "mp_rank_00")
    sa = torch.load(os.path.join(fa, "model_optim_rng.pt"), map_location="cpu", weights_only=False)
    sb = torch.load(os.path.join(fb, "model_optim_rng.pt"), map_location="cpu", weights_only=False)
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert sa["optimizer"]["adam_steps"] == sb["optimizer"]["adam_steps"] == [6.0]
    oa = torch.load(os.path.join(fa, "distrib_optim.pt"), map_location="cpu", weights_only=False)
    ob = torch.load(os.path.join(fb, "distrib_optim.pt"), map_location="cpu", weights_only=False)

    def flat(x, prefix=""):
        if isinstance(x, dict):
            for k, v in x.items():
                yield from flat(v, f"{prefix}/{k}")
        elif isinstance(x, torch.Tensor):
            yield prefix, x
    ta, tb = dict(flat(oa)), dict(flat(ob))
    assert ta.keys() == tb.keys() and {"exp_avg", "exp_avg_sq", "param"} <= \
        {k.rsplit("/", 1)[-1] for k in ta}
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert sa["opt_param_scheduler"] == sb["opt_param_scheduler"]
    assert sa["megatron_patch"]["consumed_train_samples"] == 6 * GBS
