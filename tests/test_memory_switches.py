"""The memory switches train exactly as without them (fp32, within 1e-6), on the bundled
corpus from a converted checkpoint, in this process (one gloo rank):

- AC=offload: losses and updated weights equal AC=false; the activations the first
  MP_AC_LAYERS layers save pass through the offload hooks and come back (4 layers offloaded
  move exactly 4x the bytes of 1), parameters are never copied;
- OPTIMIZER_OFFLOAD=static (fraction 1.0 and 0.5) and auto equal the distributed optimizer
  without offload; a run resumed from a checkpoint written with offload on reproduces the
  uninterrupted run bit for bit (and resumes with offload off too);
- packed SFT (THD, BATCH_SIZE=2) equals the dense block-diagonal mask it replaced.
TP=2 and DP=2 with the distributed optimizer: tests/test_memory_switches_parallel.py.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch


GBS, SEQ, ITERS = 4, 64, 4
SFT_SEQ = 256  # several alpaca samples per packed row
TOL = 1e-6


def config(w, out, ac="false", offload="false", do="false", iters=ITERS, save=100, tp=1,
           sft=False, mbs=1, env=None):
    from megatron_patch.training.arguments import build_config
    data = w.sft_json if sft else w.corpus
    seq = SFT_SEQ if sft else SEQ
    args = ["dsw", "auto", mbs, GBS, "1e-3", "1e-4", seq, seq, "fp32", tp, 1, 1, "false", do,
            "true", str(sft).lower(), ac, offload, save, data, data, w.release,
            iters if sft else iters * GBS * SEQ, 0, out]
    env = dict(env or {})
    if sft:
        env.update(MP_DATASET_TYPE="raw")
    return build_config([str(a) for a in args], "llama2", env=env).replace(eval_iters=0)


def weights(run) -> dict:
    return {f"{i}.{k}": v.detach().float().clone()
            for i, c in enumerate(run.chunks) for k, v in c.module.state_dict().items()
            if v is not None and not k.endswith("_extra_state")}


def summary(run) -> dict:
    return {"losses": [h["loss"] for h in run.history], "weights": weights(run)}


def assert_same(got: dict, ref: dict, tol: float = TOL, what: str = "",
                weight_tol: float = None) -> float:
    """Losses and weights within tol; returns the largest weight difference."""
    assert len(got["losses"]) == len(ref["losses"]) > 0
    for a, b in zip(got["losses"], ref["losses"]):
        assert abs(a - b) <= tol, (what, got["losses"], ref["losses"])
    assert sorted(got["weights"]) == sorted(ref["weights"])
    moved = 0.0
    for k, v in ref["weights"].items():
        torch.testing.assert_close(got["weights"][k], v, atol=weight_tol or tol, rtol=0,
                                   msg=f"{what} {k}")
        moved = max(moved, (v - got["weights"][k]).abs().max().item())
    return moved


def dense_forward_step(data_iterator, model):
    """The reference for packed SFT: the same rows with the dense [b, 1, s, s]
    block-diagonal causal mask (what MP_SFT_PACKING used before THD)."""
    from functools import partial

    from megatron_patch.training.forward_step import masked_lm_loss
    batch = dict(next(data_iterator))
    cu = batch.pop("cu_seqlens").long()
    batch.pop("max_seqlen")
    b, s = batch["tokens"].shape
    flat = torch.arange(b * s)
    segment = (torch.searchsorted(cu, flat, right=True) - 1).view(b, s)
    keep = (segment[:, :, None] == segment[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()
    output = model(batch["tokens"], batch["position_ids"], ~keep[:, None], labels=batch["labels"])
    return output, partial(masked_lm_loss, batch["loss_mask"])


def with_dense_attention(fn):
    """Run fn with dense_forward_step, and pipelines exchanging [s, b, h] again."""
    import megatron_patch.training.forward_step as fs
    import megatron_patch.training.loop as loop
    saved = fs.forward_step, loop._schedule_shape
    fs.forward_step = dense_forward_step
    loop._schedule_shape = lambda cfg, seq_len: (seq_len, cfg.data.micro_batch_size)
    try:
        return fn()
    finally:
        fs.forward_step, loop._schedule_shape = saved


def copy_checkpoint(src_dir: str, dst_dir: str, iteration: int) -> None:
    from megatron_patch import checkpoint as ck
    name = ck.iteration_dirname(iteration)
    os.makedirs(dst_dir)
    shutil.copytree(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    ck.write_tracker(dst_dir, iteration)


# ---- single process ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """Every single-process run once (a few seconds each)."""
    from megatron_patch.training.loop import train
    out = tmp_path_factory.mktemp("memory_switches")
    w, res, logs = world, {}, {}

    def go(name, cfg):
        run = train(cfg, log_to_file=False) if name != "sft_dense" else \
            with_dense_attention(lambda: train(cfg, log_to_file=False))
        res[name] = dict(summary(run), run=run)
        return run

    go("plain", config(w, str(out / "plain")))
    go("ac_offload", config(w, str(out / "ac1"), ac="offload"))
    go("ac_offload_4", config(w, str(out / "ac4"), ac="offload", env={"MP_AC_LAYERS": 4}))
    go("do", config(w, str(out / "do"), do="true"))
    go("static", config(w, str(out / "static"), offload="static"))
    go("auto", config(w, str(out / "auto"), offload="auto"))
    # resume: 6 iterations saving at 3 with half of the Adam state offloaded, then fresh runs
    # from a copy of checkpoint 3, with the switch on and off
    half = {"MP_OFFLOAD_FRACTION": "0.5"}
    full = go("half_full", config(w, str(out / "half_full"), offload="static", iters=6, save=3,
                                  env=half))
    for name, kw in (("half_resumed", dict(offload="static", env=half)),
                     ("half_resumed_off", dict(do="true"))):
        cfg = config(w, str(out / name), iters=6, save=3, **kw)
        copy_checkpoint(full.cfg.checkpoint_dir, cfg.checkpoint_dir, 3)
        go(name, cfg)
    go("sft_thd", config(w, str(out / "sft_thd"), sft=True, mbs=2,
                         env={"MP_SFT_PACKING": "true"}))
    go("sft_dense", config(w, str(out / "sft_dense"), sft=True, mbs=2,
                           env={"MP_SFT_PACKING": "true"}))
    return res


def test_activation_offload_trains_exactly_like_no_offload(runs):
    moved = assert_same(runs["ac_offload"], runs["plain"], what="AC=offload")
    assert moved == 0.0  # the hooks hand back the very values: bit-identical here
    assert runs["plain"]["losses"][-1] < runs["plain"]["losses"][0]


def test_activation_offload_moves_what_the_first_layers_save(runs):
    one = runs["ac_offload"]["run"].activation_offload
    four = runs["ac_offload_4"]["run"].activation_offload
    assert runs["plain"]["run"].activation_offload is None
    assert one.packed_bytes > 0 and one.unpacked_bytes == one.packed_bytes
    # identical layers: offloading all 4 moves exactly 4x what offloading the first moves
    assert four.packed_bytes == 4 * one.packed_bytes
    assert one.skipped_param_bytes > 0  # weights were offered to the hook and kept in place
    assert_same(runs["ac_offload_4"], runs["plain"], what="AC=offload, 4 layers")


def test_host_offload_copies_and_restores_exact_gradients(mp1):
    """The copy path (what a GPU run takes): every saved activation is copied into a host
    buffer and restored from it; gradients equal the run without hooks bit for bit."""
    from llama_fixtures import small_arch
    from megatron_patch.models.llama.config import transformer_config
    from megatron_patch.models.llama.provider import build_llama
    from megatron_patch.transformer.activation_offload import HostOffload
    arch = small_arch()
    torch.manual_seed(0)
    model = build_llama(arch, transformer_config(arch))
    tokens = torch.randint(0, arch.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))

    def grads(offload=None):
        model.zero_grad()
        out = model(tokens[:, :-1], torch.arange(32)[None], None, labels=tokens[:, 1:])
        out.sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = grads()
    offload = HostOffload(copy_host_tensors=True)
    offload.attach(model.decoder.layers[0])
    got = grads(offload)
    assert offload.copied_bytes == offload.packed_bytes == offload.unpacked_bytes > 0
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


def test_optimizer_offload_trains_like_the_distributed_optimizer(runs):
    for name in ("static", "auto"):
        assert_same(runs[name], runs["do"], what=name)
    run = runs["static"]["run"]
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer
    hybrid = run.optimizer.optimizer
    assert isinstance(hybrid, HybridDeviceOptimizer)
    assert run.cfg.optim.distributed_optimizer  # forced on (DO=false was given)
    assert hybrid.offload_fraction == 1.0 and hybrid.gpu_optimizer is None
    # every parameter shard is stepped on a host copy, which holds the Adam moments
    assert len(hybrid.cpu_copys_map_gpu_param) == sum(len(g["params"])
                                                        for g in hybrid.param_groups)
    auto = runs["auto"]["run"].optimizer.optimizer
    assert auto.offload_fraction == 0.0 and not auto.cpu_optimizers  # nothing to gain here


def test_half_offloaded_resume_is_bit_identical(runs):
    full, resumed = runs["half_full"], runs["half_resumed"]
    hybrid = full["run"].optimizer.optimizer
    assert hybrid.cpu_optimizers and hybrid.gpu_optimizer is not None  # really split
    assert [h["iteration"] for h in resumed["run"].history] == [4, 5, 6]
    assert resumed["losses"] == full["losses"][3:]
    for k, v in full["weights"].items():
        assert torch.equal(resumed["weights"][k], v), k
    # the same checkpoint resumes without offload (same files): equal within fp32 rounding
    off = runs["half_resumed_off"]
    assert_same(off, dict(full, losses=full["losses"][3:]), what="resumed without offload")


def test_packed_sft_thd_trains_like_the_dense_mask(runs):
    from megatron_patch.training.data_setup import build_data
    thd, dense = runs["sft_thd"], runs["sft_dense"]
    assert thd["run"].cfg.data.micro_batch_size == 2
    train_ds, _, to_sample, _ = build_data(thd["run"].cfg, thd["run"].arch, note=lambda _: None)
    rows = [to_sample(train_ds[i]) for i in range(GBS * ITERS)]
    assert sum(len(r["cu_seqlens"]) > 3 for r in rows) >= GBS  # rows really hold samples
    # the same math, rounded differently: the dense reference rotates every row with the
    # positions 0..s-1 (rope is relative, so only rounding changes), THD restarts them per
    # sample. Losses stay within 2e-6; Adam turns the rounding of a few near-zero gradient
    # elements into weight differences of a few 1e-6 (measured: 2 of 150k above 1e-6,
    # largest 3.5e-6), against updates of ~1e-3 -- a sample seeing another moves the loss
    # by far more (test_sft_packing_attention.py)
    assert_same(thd, dense, tol=2e-6, weight_tol=1e-5, what="packed SFT THD vs dense mask")


def test_offload_fraction_plan():
    from megatron_patch.training.offload import plan_offload_fraction
    G = 2 ** 30
    assert plan_offload_fraction(12 * G, 80 * G, 20 * G) == 0.0        # fits
    assert plan_offload_fraction(96 * G, 40 * G, 10 * G) == 0.69        # 30 of 96 stay
    assert plan_offload_fraction(96 * G, 10 * G, 12 * G) == 1.0        # no room at all
    assert plan_offload_fraction(0, 1 * G, 2 * G) == 0.0
    assert plan_offload_fraction(100, 75, 0) == 0.25                   # exact quarter


def test_auto_reports_the_host_is_the_device(runs, capsys):
    from megatron_patch.backends import active_backend
    from megatron_patch.training.offload import optimizer_offload_fraction
    run = runs["auto"]["run"]
    lines = []
    f = optimizer_offload_fraction(run.cfg, run.arch, run.chunks, active_backend(), 1, 4,
                                   log=lines.append)
    assert f == 0.0 and "host memory" in lines[0] and "0.0" in lines[0]


class _FakeGpu:
    name, pins_host_memory = "fake", True

    def __init__(self, free, total):
        self.mem = (free, total)

    def device_memory(self, local_rank=0):
        return self.mem


def test_auto_plans_from_free_device_memory(runs):
    """The planner sees 12 bytes of Adam state per parameter (sharded over DP with DO)
    and keeps the activation estimate plus 10 % of the device free."""
    from megatron_patch.training import offload
    run = runs["auto"]["run"]
    params = sum(p.numel() for c in run.chunks for p in c.parameters())
    state = 12 * params
    act = offload.activation_bytes_estimate(run.cfg, run.arch, run.arch.num_layers, 4)
    total = 10 * state
    keep = act + 0.1 * total
    slack = state / 1000  # float rounding must not tip the rounded-up fraction
    for free, want in ((keep + state + slack, 0.0), (keep + state / 4 + slack, 0.75),
                       (act, 1.0)):
        lines = []
        got = offload.optimizer_offload_fraction(run.cfg, run.arch, run.chunks,
                                                 _FakeGpu(free, total), 1, 4, log=lines.append)
        assert got == want, (got, want, lines)
        assert f"offload fraction {want:.2f}" in lines[0]
    # DP=2 with the distributed optimizer halves the state to place
    got = offload.optimizer_offload_fraction(run.cfg, run.arch, run.chunks,
                                             _FakeGpu(keep + state / 4 + slack, total),
                                             2, 4, log=lambda _: None)
    assert got == 0.5


# ---- the launcher's arguments ----------------------------------------------------------------
def _build(w, tmp_path, ac="false", offload="false", do="false", sft=False, cp=1, env=None):
    from megatron_patch.training.arguments import build_config
    data = w.sft_json if sft else w.corpus
    args = ["dsw", "auto", 1, GBS, "1e-3", "1e-4", SEQ, SEQ, "fp32", 1, 1, cp, "false", do,
            "true", str(sft).lower(), ac, offload, 100, data, data, w.release, 100 * GBS * SEQ,
            0, str(tmp_path)]
    env = dict(env or {})
    if sft:
        env["MP_DATASET_TYPE"] = "raw"
    return build_config([str(a) for a in args], "llama2", env=env)


def test_arguments(world, tmp_path):
    from megatron_patch.training.config import ConfigError
    cfg = _build(world, tmp_path, offload="auto")
    assert cfg.optim.distributed_optimizer and cfg.optim.offload == "auto"
    assert any("needs the distributed optimizer: DO=true" in n for n in cfg.notes)
    assert "-do-true-" in cfg.run_name
    cfg = _build(world, tmp_path, offload="static", do="true",
                 env={"MP_OFFLOAD_FRACTION": "0.25"})
    assert cfg.optim.offload_fraction == 0.25 and not any("DO=true" in n for n in cfg.notes)
    cfg = _build(world, tmp_path, offload="auto", env={"MP_OFFLOAD_FRACTION": "0.25"})
    assert cfg.optim.offload_fraction is None
    assert any("MP_OFFLOAD_FRACTION=0.25 only applies" in n for n in cfg.notes)
    cfg = _build(world, tmp_path, ac="offload", env={"MP_AC_LAYERS": "4"})
    assert cfg.memory.recompute == "offload" and cfg.memory.recompute_num_layers == 4
    bad = [
        (dict(ac="offload", env={"MP_AC_LAYERS": "5"}), "MP_AC_LAYERS=5 is not valid: must be "
         "<= the 4 layers per pipeline stage"),
        (dict(offload="static", env={"MP_OFFLOAD_FRACTION": "1.5"}),
         "MP_OFFLOAD_FRACTION='1.5' is not valid: must be a fraction between 0 and 1"),
        (dict(offload="static", env={"MP_OFFLOAD_FRACTION": "half"}),
         "MP_OFFLOAD_FRACTION='half' is not valid"),
        (dict(sft=True, cp=2, env={"MP_SFT_PACKING": "true"}),
         "MP_SFT_PACKING='true' is not supported with CP=2"),
    ]
    for kw, msg in bad:
        with pytest.raises(ConfigError) as e:
            _build(world, tmp_path, **kw)
        assert str(e.value).startswith(msg), str(e.value)
        assert "\n" not in str(e.value)
