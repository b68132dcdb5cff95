"""Context parallelism in 4 gloo processes (one world for every multi-process CP test):

- the CP core attention at CP=2 and CP=4 against full-sequence attention in float64, wrong
  chunk orders caught (test_cp_attention.attention_checks);

and the training loop against CP=1 runs of the same job (the converted checkpoint of
train_helpers' world, fp32):

- CP=2 (x DP=2), CP=4, CP=2 x TP=2 with SP, CP=2 x PP=2 with full recompute, and CP=2 x DP=2
  with the distributed optimizer and selective recompute give the CP=1 loss at every
  iteration, and the gradients of the first step within 1e-5 relative;
- SFT on the bundled alpaca samples (answer-only labels, raw json): CP=2 equals CP=1;
- a checkpoint saved at CP=2 resumes at CP=1 (also with the distributed optimizer) and one
  saved at CP=1 resumes at CP=2; the resumed iterations give the uninterrupted runs' losses;
- peak tensor memory of a 4096-token training step per rank: CP=2 clearly below CP=1
  (measured in the same workers after the training runs);
- the launcher with CP=2 (2 processes) logs the CP attention and the CP=1 losses.
"""
from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

from mp_utils import run_distributed
from train_helpers import launcher_env, run_launcher

pytestmark = pytest.mark.slow  # multi-process / end-to-end

ITERS, GBS, SEQ, SFT_LEN = 4, 4, 64, 128
_SECTION = {"sequence_parallel": "parallel", "recompute": "memory",
            "recompute_num_layers": "memory"}

# name: (TP, PP, CP, DO, extra config); all in a 4-process world, so DP = 4 / (TP x PP x CP)
CASES = {
    "cp2": (1, 1, 2, False, {}),
    "cp4": (1, 1, 4, False, {}),
    "cp2_tp2_sp": (2, 1, 2, False, {"sequence_parallel": True}),
    "cp2_pp2_full_recompute": (1, 2, 2, False, {"recompute": "full"}),
    "cp2_dp2_do_sel_recompute": (1, 1, 2, True, {"recompute": "sel"}),
}


RESUMED = ("cp2", "cp2_dp2_do_sel_recompute")  # these save at iteration 2


def _cfg(w, out, tp=1, pp=1, cp=1, do=False, iters=ITERS, save=100, sft=False, **kw):
    from megatron_patch.training.arguments import build_config
    if sft:
        data, length, n, env = w.sft_json, SFT_LEN, iters, {"MP_DATASET_TYPE": "raw"}
    else:
        data, length, n, env = w.corpus, SEQ, iters * GBS * SEQ, {}
    args = ["dsw", "auto", 1, GBS, "1e-3", "1e-4", length, length, "fp32", tp, pp, cp, "false",
            str(do).lower(), "true", str(sft).lower(), "false", "false", save, data, data,
            w.release, n, 0, out]
    cfg = build_config([str(a) for a in args], "llama2", env=env)
    sections = {}
    for k, v in kw.items():
        sections.setdefault(_SECTION[k], {})[k] = v
    return cfg.replace(eval_iters=0, **sections)


def _train(cfg):
    """train(cfg) -> (losses, this rank's first-step gradients with their place in the
    layout). The gradients are read when the optimizer step begins (after megatron's
    finalize_model_grads: DP x CP all-reduce, scaled by the global token count)."""
    from megatron.core import parallel_state as ps

    from megatron_patch.models.llama import mapping
    from megatron_patch.training import loop
    holder, grads = {}, []
    real_setup, real_step = loop.setup, loop.optimizer_step

    def setup(*a, **kw):
        holder["run"] = run = real_setup(*a, **kw)
        return run

    def step(optimizer, clip):
        if not grads and not cfg.optim.distributed_optimizer:  # DO shards the buffers
            grads.append([{k: p.main_grad.detach().clone() for k, p in
                           c.module.named_parameters()} for c in holder["run"].chunks])
        return real_step(optimizer, clip)
    loop.setup, loop.optimizer_step = setup, step
    try:
        run = loop.train(cfg, log_to_file=False)
    finally:
        loop.setup, loop.optimizer_step = real_setup, real_step
    p = cfg.parallel
    pp_rank = ps.get_pipeline_model_parallel_rank()
    layers = mapping.stage_layers(run.arch.num_layers, p.pp, pp_rank)
    place = dict(tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=pp_rank,
                 cp_rank=ps.get_context_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                 layers=layers, first=pp_rank == 0, last=pp_rank == p.pp - 1)
    return [h["loss"] for h in run.history], (grads[0] if grads else None), place


def _copy_checkpoint(src_run_dir, dst_cfg, iteration):
    import torch.distributed as dist

    from megatron_patch import checkpoint as ck
    if dist.get_rank() == 0:
        name = f"iter_{iteration:07d}"
        os.makedirs(dst_cfg.checkpoint_dir)
        shutil.copytree(os.path.join(src_run_dir, name),
                        os.path.join(dst_cfg.checkpoint_dir, name))
        ck.write_tracker(dst_cfg.checkpoint_dir, iteration)
    dist.barrier()


def _worker(rank, world, root, out):
    from test_cp_attention import attention_checks
    from train_helpers import World
    w = World(root)
    res = {"attention": attention_checks()}
    ref_cfg = _cfg(w, os.path.join(out, "cp1"), save=2)
    res["cp1"] = _train(ref_cfg)
    for name, (tp, pp, cp, do, extra) in CASES.items():
        res[name] = _train(_cfg(w, os.path.join(out, name), tp, pp, cp, do,
                                save=2 if name in RESUMED else 100, **extra))
    # SFT, answer-only labels
    res["sft_cp1"] = _train(_cfg(w, os.path.join(out, "sft_cp1"), sft=True))
    res["sft_cp2"] = _train(_cfg(w, os.path.join(out, "sft_cp2"), cp=2, sft=True))
    # resume across CP sizes: iteration 2 of one layout, continued in the other
    cp2_dir = _cfg(w, os.path.join(out, "cp2"), cp=2).checkpoint_dir
    to_cp1 = _cfg(w, os.path.join(out, "resume_cp2_to_cp1"))
    _copy_checkpoint(cp2_dir, to_cp1, 2)
    res["resume_cp2_to_cp1"] = _train(to_cp1)
    to_cp2 = _cfg(w, os.path.join(out, "resume_cp1_to_cp2"), cp=2)
    _copy_checkpoint(ref_cfg.checkpoint_dir, to_cp2, 2)
    res["resume_cp1_to_cp2"] = _train(to_cp2)
    # distributed optimizer: its state re-sharded from DP x CP = 2 x 2 to DP = 4
    do_dir = _cfg(w, os.path.join(out, "cp2_dp2_do_sel_recompute"), cp=2, do=True,
                  recompute="sel").checkpoint_dir
    do_to_cp1 = _cfg(w, os.path.join(out, "resume_do_cp2_to_cp1"), do=True, recompute="sel")
    _copy_checkpoint(do_dir, do_to_cp1, 2)
    res["resume_do_cp2_to_cp1"] = _train(do_to_cp1)
    res["memory"] = _peak_step_memory()
    return res


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cp_runs"))
    return run_distributed(_worker, 4, world.root, out, timeout=1200)


def _merged_grads(runs, name, arch):
    """First-step gradients of one run, TP shards and PP stages joined, in HF names."""
    from megatron_patch.models.llama import mapping
    merged = {}
    places = [(r[name][2], r[name][1]) for r in runs]
    for place, grads in places:
        if place["tp_rank"] or place["cp_rank"] or place["dp_rank"]:
            continue
        shards = [g[0] for p, g in sorted(
            ((p, g) for p, g in places if p["pp_rank"] == place["pp_rank"]
             and p["cp_rank"] == 0 and p["dp_rank"] == 0), key=lambda x: x[0]["tp_rank"])]
        merged.update(mapping.stage_to_hf_state(shards, arch, place["layers"], place["first"],
                                                place["last"]))
    return merged


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("name", list(CASES))
def test_cp_layouts_reproduce_cp1(runs, world, name):
    ref = runs[0]["cp1"][0]
    assert len(ref) == ITERS and ref[-1] < ref[0]
    for r in runs:
        got = r[name][0]
        assert len(got) == ITERS
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, ref)), (name, got, ref)
    if CASES[name][3]:  # distributed optimizer: gradients are sharded, losses compared
        return
    arch = world.arch()
    ref_grads, got_grads = _merged_grads(runs, "cp1", arch), _merged_grads(runs, name, arch)
    assert set(got_grads) == set(ref_grads) and len(ref_grads) > 10
    worst = max((_rel(got_grads[k], g), k) for k, g in ref_grads.items())
    print(f"{name}: losses {runs[0][name][0]}, worst gradient relative error {worst}")
    assert worst[0] < 1e-5, worst


def test_cp_sft_equals_cp1(runs):
    ref = runs[0]["sft_cp1"][0]
    assert len(ref) == ITERS
    for r in runs:
        got = r["sft_cp2"][0]
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, ref)), (got, ref)


def test_sft_answer_tokens_differ_between_cp_ranks(world):
    """Why the loss must be a global token mean: in the SFT samples the runs above train on
    (the same dataset and shuffle as data_setup.build_data), the two CP=2 ranks of a
    sample mostly hold different numbers of answer tokens, so a mean per rank would weight
    tokens wrongly and the SFT comparison would catch it."""
    from megatron_patch.data.sft_dataset import SFTDataset
    from megatron_patch.tokenizer import load_tokenizer
    from megatron_patch.training.batches import CyclicShuffled, sft_sample
    cfg = _cfg(world, "/nonexistent-unused", cp=2, sft=True)
    data = SFTDataset(world.sft_json, load_tokenizer(world.tokenizer), SFT_LEN, "raw",
                      "llama2", False, verbose=False)
    stream = CyclicShuffled(data, cfg.seed)
    c = SFT_LEN // 4  # rank 0: chunks 0 and 3, rank 1: chunks 1 and 2
    uneven = 0
    for i in range(GBS * ITERS):
        mask = sft_sample(stream[i])["loss_mask"]
        assert mask.sum() > 0
        uneven += int(mask[:c].sum() + mask[3 * c:].sum() != mask[c:3 * c].sum())
    assert uneven >= GBS * ITERS // 2, uneven


@pytest.mark.parametrize("direction,reference", [("resume_cp2_to_cp1", "cp1"),
                                                 ("resume_cp1_to_cp2", "cp2"),
                                                 ("resume_do_cp2_to_cp1", "cp1")])
def test_checkpoint_resumes_across_cp(runs, direction, reference):
    for r in runs:
        resumed, full = r[direction][0], r[reference][0]
        assert len(resumed) == ITERS - 2  # iterations 3 and 4 only
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(resumed, full[2:])), \
            (direction, resumed, full)


# ---- the attention alone (checks in test_cp_attention.attention_checks) -------------------
@pytest.mark.parametrize("cp", [2, 4])
def test_cp_attention_equals_full_sequence(runs, cp):
    """Each rank's output and q/k/v gradients (K/V gradients after the all-gather's
    reduce-scatter) equal full-sequence causal attention in float64, on both kernel paths;
    megatron's batch split puts the same positions on the rank."""
    for r in runs:
        res = r["attention"][cp]
        assert res["split_matches"]
        for path in ("cpu", "sdpa_bias"):
            assert max(res[path]) < 1e-5, (cp, path, res[path])


@pytest.mark.parametrize("cp", [2, 4])
def test_wrong_chunk_order_is_caught(runs, cp):
    """The comparison is sensitive to the layout: swapping a rank's two chunks, or not
    putting the gathered K/V back into sequence order, gives clearly different outputs."""
    for r in runs:
        res = r["attention"][cp]
        assert res["swapped"] > 1e-2 and res["gather_order"] > 1e-2, res


def test_gqa_gathers_kv_heads_not_query_heads(runs):
    """One all-gather per call, of K and V with their 2 KV heads (4 rows), never the 4
    query heads repeated (8 rows)."""
    from test_cp_attention import NG
    for r in runs:
        shapes = r["attention"]["gathered"]
        assert shapes and all(shape[2] == 2 * NG for shape in shapes), shapes


# ---- memory ------------------------------------------------------------------------------
MEM_SEQ = 4096


def _peak_step_memory():
    """Peak bytes of live tensors during one forward+backward of a 4096-token sequence per
    CP group, CP=1 (each rank a whole sequence) and CP=2 (each rank half of one).

    Measured with torch's MemTracker (a dispatch mode that counts the bytes of every live
    tensor): unlike RSS it is not moved by the allocator's caching, by other processes on a
    shared machine or by what ran before in this process, so CP=1 and CP=2 can be measured
    one after the other in the same workers."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from torch.distributed._tools.mem_tracker import MemTracker

    from llama_fixtures import small_arch
    from megatron_patch import parallel
    from megatron_patch.models.llama.config import ParallelSettings, transformer_config
    from megatron_patch.training.forward_step import forward_step
    from megatron_patch.training.model_setup import build_model_chunks

    arch = small_arch(vocab_size=512, layers=2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (1, MEM_SEQ + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(1, MEM_SEQ), "position_ids": torch.arange(MEM_SEQ)[None]}
    peaks = {}
    for cp in (1, 2):
        parallel.initialize_model_parallel(cp=cp)
        cfg = transformer_config(arch, ParallelSettings(cp=cp), "fp32",
                                 calculate_per_token_loss=True)
        # without megatron's DDP wrapper (its ``buffers`` attribute shadows
        # Module.buffers(), which MemTracker calls): gradients land in param.grad, counted
        (chunk,) = build_model_chunks(arch, cfg, wrap_ddp=False)
        tracker = MemTracker()
        tracker.track_external(chunk)
        with tracker:
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([batch]), model=[chunk],
                num_microbatches=1, seq_length=MEM_SEQ, micro_batch_size=1,
                forward_only=False)
        peaks[cp] = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
        del chunk, tracker
    return peaks


def test_long_sequence_peak_memory_per_rank(runs):
    for p in (r["memory"] for r in runs):
        print(f"peak tensor memory per rank, {MEM_SEQ} tokens: CP=1 {p[1] / 2**20:.1f} MiB, "
              f"CP=2 {p[2] / 2**20:.1f} MiB ({p[2] / p[1]:.2f}x)")
        assert p[2] < 0.7 * p[1], p


# ---- the launcher ------------------------------------------------------------------------
LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([\d.E+-]+) \|")


def test_launcher_cp2(runs, world, tmp_path):
    """The 25-argument launcher with CP=2 on 2 processes: the CP attention is logged and
    the losses are the CP=1 run's (same data, same global batch)."""
    out = str(tmp_path / "out")
    args = ["dsw", "auto", 1, GBS, "1e-3", "1e-4", SEQ, SEQ, "fp32", 1, 1, 2, "false",
            "false", "true", "false", "false", "false", 100, world.corpus, world.corpus,
            world.release, ITERS * GBS * SEQ, 0, out]
    p = run_launcher(args, "llama2", env=launcher_env(MP_NPROC=2, MP_EVAL_ITERS=0),
                     cwd=str(tmp_path))
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert "context parallelism CP=2: ContextParallelAttention" in log, log[-3000:]
    assert "CP=2 DP=1" in log
    losses = [float(m.group(2)) for m in LOSS_RE.finditer(log)]
    ref = runs[0]["cp1"][0]
    assert len(losses) == ITERS
    # the log prints 6 significant digits
    assert all(abs(a - b) <= 2e-5 * abs(b) for a, b in zip(losses, ref)), (losses, ref)
