"""The training loop in gloo processes, on the bundled corpus, starting from a checkpoint
converted from an HF model:

- the first iteration's loss equals the HF model's loss on the same batch;
- DP=2 runs give the TP=1/PP=1 loss curve for 5 iterations (fp32 tolerance); DO=true gives
  the DO=false losses and weights (the other layouts: test_parallel_layouts*.py);
- resuming from the iteration-3 checkpoint in fresh model/optimizer objects reproduces
  iterations 4-6 of the uninterrupted run bit for bit (TP=2; and DO + fp16 with a checkpoint
  taken before the optimizer's first successful step); the SIGKILL resume of a launched run
  with the distributed optimizer is in test_train_resume.py;
- fp16 loss scaling skips overflowing steps; a NaN loss is detected and its step skipped.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from mp_utils import run_distributed

pytestmark = pytest.mark.slow  # multi-process / end-to-end

ITERS, GBS, SEQ = 5, 4, 64


_SECTION = {"sequence_parallel": "parallel", "vp": "parallel", "initial_loss_scale": "precision"}


def _cfg(w, out, tp=1, pp=1, do=False, prec="fp32", iters=ITERS, save=100, env=None, **kw):
    from megatron_patch.training.arguments import build_config
    args = ["dsw", "auto", 1, GBS, "1e-3", "1e-4", SEQ, SEQ, prec, tp, pp, 1, "false",
            str(do).lower(), "true", "false", "false", "false", save, w.corpus, w.corpus,
            w.release, iters * GBS * SEQ, 0, out]
    cfg = build_config([str(a) for a in args], "llama2", env=env or {})
    sections = {}
    for k, v in kw.items():
        sections.setdefault(_SECTION[k], {})[k] = v
    return cfg.replace(eval_iters=1, **sections)


def _weights(run) -> dict:
    out = {}
    for i, c in enumerate(run.chunks):
        for k, v in c.module.state_dict().items():
            if v is not None and not k.endswith("_extra_state"):
                out[f"{i}.{k}"] = v.detach().float().clone()
    return out


def _reference(rank, world, root, out):
    from transformers import LlamaForCausalLM

    from train_helpers import World
    from megatron_patch.training.data_setup import build_data
    from megatron_patch.training.loop import train
    w = World(root)
    cfg = _cfg(w, os.path.join(out, "ref"))
    run = train(cfg, log_to_file=False)
    train_ds, _, _, _ = build_data(cfg, run.arch)
    batch = torch.stack([train_ds[i]["tokens"] for i in range(GBS)])
    labels = torch.stack([train_ds[i]["labels"] for i in range(GBS)])
    hf = LlamaForCausalLM.from_pretrained(w.hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(batch).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                labels.reshape(-1)).item()
    result = {"losses": [h["loss"] for h in run.history], "hf_loss": hf_loss}

    # fp16 with a loss scale too high for this model: overflowing steps are skipped and the
    # scale backs off (hysteresis 2) until updates go through. The backward starts from
    # per-token loss sums (forward_step.masked_lm_loss), 2^8 above the mean over the 4 x 64
    # tokens of a step: 2^12 here overflows like 2^20 on a mean.
    run = train(_cfg(w, os.path.join(out, "fp16"), prec="fp16", iters=8,
                     initial_loss_scale=2.0 ** 12), log_to_file=False)
    result["fp16"] = {"history": [(h["loss"], h["updated"], h["loss_scale"]) for h in run.history],
                      "skipped": run.skipped_iters}

    # NaN in iteration 2's loss: the step is skipped (weights stay finite), counted, and
    # training goes on
    import megatron_patch.training.forward_step as fs
    orig, calls = fs.forward_step, [0]

    def poisoned(data_iterator, model):
        output, loss_fn = orig(data_iterator, model)
        calls[0] += 1
        if GBS < calls[0] <= 2 * GBS:  # the micro-batches of iteration 2
            output = output * float("nan")
        return output, loss_fn
    fs.forward_step = poisoned
    try:
        run = train(_cfg(w, os.path.join(out, "nan")), log_to_file=False)
    finally:
        fs.forward_step = orig
    result["nan"] = {"history": [(h["loss"], h["updated"]) for h in run.history],
                     "nan_iters": run.nan_iters, "skipped": run.skipped_iters,
                     "finite": all(torch.isfinite(v).all() for v in _weights(run).values())}
    return result


# TP, SP, PP and VP layouts are proven at launcher level with 4-8 processes
# (test_parallel_layouts*.py); here DP=2 with and without the distributed optimizer, whose
# weights must agree far tighter than a layout comparison allows
CASES = {  # name: (tp, pp, do, extra config)
    "dp2": (1, 1, False, {}),
    "dp2_do": (1, 1, True, {}),
}


def _parallel(rank, world, root, out):
    import shutil

    import torch.distributed as dist

    from train_helpers import World
    from megatron_patch import checkpoint as ck
    from megatron_patch.training.loop import train
    w = World(root)
    res = {}
    for name, (tp, pp, do, extra) in CASES.items():
        run = train(_cfg(w, os.path.join(out, name), tp, pp, do, **extra), log_to_file=False)
        res[name] = {"losses": [h["loss"] for h in run.history],
                     "weights": _weights(run) if name.startswith("dp2") else None}
    # resume: 6 iterations saving at 3, then a fresh run from a copy of checkpoint 3; also
    # DO + fp16 with a loss scale so high that iterations 1-3 all overflow: checkpoint 3 is
    # taken before the distributed optimizer ever stepped (per-token sums: each rank's
    # backward starts 2^7 above a mean over its 2 x 64 tokens, so 2^14 is 2^21 on a mean)
    for name, kw in (("tp2", dict(tp=2)),
                     ("dp2_do_fp16", dict(do=True, prec="fp16", initial_loss_scale=2.0 ** 14))):
        full = train(_cfg(w, os.path.join(out, name + "_full"), iters=6, save=3, **kw),
                     log_to_file=False)
        cfg = _cfg(w, os.path.join(out, name + "_resumed"), iters=6, save=3, **kw)
        if rank == 0:
            src = full.cfg.checkpoint_dir
            os.makedirs(cfg.checkpoint_dir)
            shutil.copytree(os.path.join(src, "iter_0000003"),
                            os.path.join(cfg.checkpoint_dir, "iter_0000003"))
            ck.write_tracker(cfg.checkpoint_dir, 3)
        dist.barrier()
        resumed = train(cfg, log_to_file=False)
        wf, wr = _weights(full), _weights(resumed)
        res["resume_" + name] = {
            "full": [(h["loss"], h["updated"], h["loss_scale"]) for h in full.history],
            "resumed_iters": [h["iteration"] for h in resumed.history],
            "resumed": [(h["loss"], h["updated"], h["loss_scale"]) for h in resumed.history],
            "same_weights": sorted(wf) == sorted(wr) and all(torch.equal(wf[k], wr[k])
                                                            for k in wf)}
    return res


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref_runs"))
    return run_distributed(_reference, 1, world.root, out, timeout=600)[0]


@pytest.fixture(scope="module")
def parallel(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("par_runs"))
    return run_distributed(_parallel, 2, world.root, out, timeout=900)


def test_first_loss_equals_hf(reference):
    """The converted checkpoint loads: iteration 1's loss (before any update) is HF's."""
    assert abs(reference["losses"][0] - reference["hf_loss"]) < 1e-5, reference


def test_fp16_loss_scaling_skips_overflows(reference):
    hist, skipped = reference["fp16"]["history"], reference["fp16"]["skipped"]
    assert all(math.isfinite(loss) for loss, _, _ in hist)
    assert skipped == sum(not updated for _, updated, _ in hist) >= 2
    assert any(updated for _, updated, _ in hist)
    assert hist[-1][2] < hist[0][2]  # the loss scale backed off


def test_nan_iteration_is_detected_and_skipped(reference):
    nan = reference["nan"]
    losses = [loss for loss, _ in nan["history"]]
    assert math.isnan(losses[1]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 1)
    assert [u for _, u in nan["history"]] == [True, False] + [True] * (ITERS - 2)
    assert nan["nan_iters"] == 1 and nan["skipped"] == 1 and nan["finite"]


def test_reference_learns(reference):
    l = reference["losses"]
    assert len(l) == ITERS and l[-1] < l[0] - 0.05, l


@pytest.mark.parametrize("name", list(CASES))
def test_layouts_match_tp1_pp1(parallel, reference, name):
    for rank_result in parallel:
        got = rank_result[name]["losses"]
        assert len(got) == ITERS
        for a, b in zip(got, reference["losses"]):
            assert abs(a - b) < 2e-5, (name, got, reference["losses"])


def test_distributed_optimizer_equals_plain(parallel):
    for r in parallel:
        plain, do = r["dp2"], r["dp2_do"]
        assert all(abs(a - b) < 2e-6 for a, b in zip(plain["losses"], do["losses"]))
        for k, v in plain["weights"].items():
            torch.testing.assert_close(do["weights"][k], v, atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", ["tp2", "dp2_do_fp16"])
def test_resume_bit_identical(parallel, name):
    for r in parallel:
        res = r["resume_" + name]
        assert res["resumed_iters"] == [4, 5, 6]
        assert res["resumed"] == res["full"][3:], res  # exact float equality
        assert res["same_weights"]
        if name == "dp2_do_fp16":  # saved before any successful step, updates after resume
            updated = [u for _, u, _ in res["full"]]
            assert updated[:3] == [False] * 3 and any(updated[3:]), res["full"]
