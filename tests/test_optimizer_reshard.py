"""bf16 optimizer state re-sharded across layouts, exactly.

Two gloo processes: a TP=2 bf16 run (mixed-precision optimizer: fp32 main weights next to
the bf16 model) trains 2 iterations and saves; its live optimizer state is gathered and
merged into whole tensors with the converter's TP rules. A TP=1 x DP=2 run then resumes
from that checkpoint (MP_RESUME_FROM): every fp32 main weight, exp_avg and exp_avg_sq of
its live optimizer must equal the merged ones bit for bit, and Adam's step must be 2. (The
fp32 launcher tests in test_parallel_layouts.py cover the plain fp32 and distributed
optimizers; this covers the bf16 optimizer's separate main weights.)
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from mp_utils import run_distributed
from train_helpers import make_world

pytestmark = pytest.mark.slow  # multi-process

GBS, SEQ = 4, 32


def _cfg(w, out, tp, resume_from=None):
    from megatron_patch.training.arguments import build_config
    args = ["dsw", "auto", 1, GBS, "1e-3", "1e-4", SEQ, SEQ, "bf16", tp, 1, 1, "false",
            "false", "true", "false", "false", "false", 2, w.corpus, w.corpus, w.release,
            2 * GBS * SEQ, 0, out]
    env = {"MP_RESUME_FROM": resume_from} if resume_from else {}
    return build_config([str(a) for a in args], "llama2", env=env).replace(eval_iters=0)


def _rule(name):
    from megatron_patch.models.llama import mapping
    for rule in mapping.RULES:
        if re.fullmatch(re.escape(rule.mcore).replace(r"\{i\}", r"\d+"), name):
            return rule
    raise KeyError(name)


def _whole_state(run) -> dict:
    """{(key, name): whole tensor} of the live bf16 optimizer, TP shards merged."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_patch.models.llama import mapping
    (opt,) = getattr(run.optimizer, "chained_optimizers", [run.optimizer])
    assert opt.fp32_from_float16_groups, "expected the mixed-precision optimizer"
    names = {id(p): n for n, p in run.chunks[0].module.named_parameters()}
    local = {}
    for model_g, main_g in zip(opt.float16_groups, opt.fp32_from_float16_groups):
        for model_p, main_p in zip(model_g, main_g):
            name = next(iter(mapping.to_te_names({names[id(model_p)]: None})))
            st = opt.optimizer.state[main_p]
            local[("param", name)] = main_p.detach().clone()
            local[("exp_avg", name)] = st["exp_avg"].clone()
            local[("exp_avg_sq", name)] = st["exp_avg_sq"].clone()
            local[("step", name)] = float(st["step"])
    tp = ps.get_tensor_model_parallel_world_size()
    shards = [None] * tp
    dist.all_gather_object(shards, local, group=ps.get_tensor_model_parallel_group())
    out = {}
    for key, name in local:
        if key == "step":
            out[(key, name)] = local[(key, name)]
        else:
            out[(key, name)] = mapping.merge(_rule(name), [s[(key, name)] for s in shards])
    return out


def _body(rank, world, root, out):
    from train_helpers import World
    from megatron_patch.training.loop import train
    from megatron_patch.training.setup import setup
    w = World(root)
    saved = train(_cfg(w, os.path.join(out, "a"), tp=2), log_to_file=False)
    before = _whole_state(saved)
    ckdir = saved.cfg.checkpoint_dir
    resumed = setup(_cfg(w, os.path.join(out, "b"), tp=1, resume_from=ckdir), log=lambda m: None)
    after = _whole_state(resumed)
    return {"before": before, "after": after, "iteration": resumed.iteration,
            "samples": resumed.consumed_train_samples}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    w = make_world(str(tmp_path_factory.getbasetemp() / "train_world"))
    return run_distributed(_body, 2, w.root, str(tmp_path_factory.mktemp("reshard")),
                           timeout=600)


def test_bf16_main_weights_and_moments_survive_tp2_to_tp1_dp2(result):
    for r in result:
        assert r["iteration"] == 2 and r["samples"] == 2 * GBS
        before, after = r["before"], r["after"]
        assert sorted(before) == sorted(after)
        assert {k for k, _ in before} == {"param", "exp_avg", "exp_avg_sq", "step"}
        for k in before:
            if k[0] == "step":
                assert before[k] == after[k] == 2.0, k
            else:
                assert before[k].dtype == torch.float32 and torch.equal(before[k], after[k]), k
        # the main weights are not just the bf16 weights cast back up
        assert any(not torch.equal(v, v.bfloat16().float())
                   for (key, _), v in after.items() if key == "param")
