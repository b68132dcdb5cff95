"""megatron-core's torch_dist checkpoint format: the converter writes and reads it, megatron-core
loads a converter-written one natively at TP2 x PP2, and a training checkpoint (model +
optimizer + per-rank state) saved at TP2 x PP2 loads at TP1 (DP4) equal to the per-rank
('torch') format route, its Adam state re-sharded."""
import os

import pytest
import torch

from mp_utils import run_distributed

from megatron_patch import checkpoint as ck
from megatron_patch.checkpoint import dist_format
from megatron_patch.checkpoint.layout import is_dist_checkpoint
from megatron_patch.conversion import cli
from megatron_patch.models.llama.resolve import arch_differences
from megatron_patch.conversion.synthetic import small_arch, write_hf_checkpoint
from megatron_patch.models.llama import mapping

SEQ, GBS = 16, 4


# the converter's CHECK opens a 1-process group in this process (conftest.py)
pytestmark = pytest.mark.usefixtures("process_group_closed_after_module")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("MP_CHECK_LONG", "0")
    monkeypatch.delenv("MP_CKPT_FORMAT", raising=False)


def _hf_of(path):
    from safetensors.torch import load_file
    out = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


@pytest.mark.parametrize("tie", [False, True])
def test_converter_writes_and_reads_torch_dist(tmp_path, capsys, monkeypatch, tie):
    """HF -> torch_dist (CHECK reads it back) -> HF is bit-exact; the files are megatron-core's
    layout: layer-stacked global tensors, padded vocabulary, metadata.json, common.pt."""
    arch = small_arch("llama2", tie_word_embeddings=tie)
    sd = write_hf_checkpoint(str(tmp_path / "hf"), arch, seed=4)
    monkeypatch.setenv("MP_CKPT_FORMAT", "torch_dist")
    assert cli.main(["auto", str(tmp_path / "hf"), str(tmp_path / "mc"), "2", "1", "false",
                     "true", "false", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "CHECK PASSED" in out and "torch_dist" in out
    ckpt = ck.find_checkpoint(str(tmp_path / "mc"))
    assert ckpt.format == "torch_dist" and ckpt.iteration == "release"
    assert is_dist_checkpoint(ckpt.path)
    meta = dist_format.DistFile(ckpt.path).tensors
    qkv = meta["decoder.layers.self_attention.linear_qkv.weight"].size
    assert tuple(qkv) == (arch.num_layers, 3 * arch.hidden_size, arch.hidden_size)
    assert tuple(meta["embedding.word_embeddings.weight"].size)[0] == arch.padded_vocab_size(2)
    assert ("output_layer.weight" in meta) != tie
    assert not arch_differences(ck.checkpoint_arch(ckpt), arch)  # args in common.pt
    monkeypatch.delenv("MP_CKPT_FORMAT")
    assert cli.main(["auto", str(tmp_path / "mc"), str(tmp_path / "back"), "1", "1", "true",
                     "true", "false", "fp32"]) == 0
    back = _hf_of(tmp_path / "back")
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # the generic loader re-shards it for any layout (inference / evaluation use it)
    state = ck.load_model_state(str(tmp_path / "mc"), tp=2, pp=2, tp_rank=1, pp_rank=1)[0]
    want = mapping.hf_to_mcore_state(sd, arch, 2, 1, [2, 3], False, True)
    if tie:
        from megatron_patch.checkpoint.load import TIED_OUTPUT_RULE
        full = mapping.pack(TIED_OUTPUT_RULE, [sd["model.embed_tokens.weight"]], arch,
                            arch.padded_vocab_size(2))
        want["output_layer.weight"] = mapping.shard(TIED_OUTPUT_RULE, full, 2, 1)
    assert sorted(state) == sorted(want) and all(torch.equal(state[k], want[k]) for k in want)


# ---- multi-process: native loads and training checkpoints ----------------------------------
# (name, distributed optimizer, precision)
CASES = [("adam", False, "fp32"), ("distributed_optimizer", True, "fp32"),
         ("adam_bf16", False, "bf16")]


def _model_at(arch, tp, pp, init=True, do=False, precision="fp32"):
    from megatron_patch import parallel
    from megatron_patch.models.llama.config import ParallelSettings, transformer_config
    from megatron_patch.training.model_setup import build_model_chunks

    if init:
        parallel.initialize_model_parallel(tp, pp)
    cfg = transformer_config(arch, ParallelSettings(tp, pp), precision)
    return cfg, build_model_chunks(arch, cfg, use_distributed_optimizer=do)


def _train_steps(chunks, opt, cfg, data, steps):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patch.training.forward_step import forward_step
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.grad_scale_func = opt.scale_loss
    cfg.no_sync_func = chunks[0].no_sync
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    for step in range(steps):
        batch = data[step][dp_rank * (GBS // dp):(dp_rank + 1) * (GBS // dp)]
        micro = [{"tokens": s[None, :-1], "labels": s[None, 1:], "loss_mask": torch.ones(1, SEQ),
                  "position_ids": torch.arange(SEQ)[None]} for s in batch]
        for c in chunks:
            c.zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro),
                                    model=chunks, num_microbatches=len(micro), seq_length=SEQ,
                                    micro_batch_size=1, forward_only=False)
        ok, _, _ = opt.step()
        assert ok


def _hf_named(chunk, tensors_by_name, arch, tp, pp):
    """This rank's {local param name: tensor} as per-TP-rank lists -> HF names (merged)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    gathered = [None] * tp
    dist.all_gather_object(gathered, tensors_by_name, group=ps.get_tensor_model_parallel_group())
    p = ps.get_pipeline_model_parallel_rank()
    layers = mapping.stage_layers(arch.num_layers, pp, p)
    return mapping.stage_to_hf_state(gathered, arch, layers, p == 0, p == pp - 1)


def _adam_state(opt, chunk):
    """{"exp_avg"|"exp_avg_sq"|"main": {local param name: tensor}} of a non-distributed
    megatron optimizer (fp32: the model params are the main params; bf16: fp32 copies)."""
    names = {id(p): n for n, p in chunk.module.named_parameters()}
    (o,) = getattr(opt, "chained_optimizers", [opt])
    if hasattr(o, "float16_groups"):
        pairs = [pm for mg, fg in zip(o.float16_groups, o.fp32_from_float16_groups)
                 for pm in zip(mg, fg)]
    else:
        pairs = [(p, p) for g in o.optimizer.param_groups for p in g["params"]]
    out = {"exp_avg": {}, "exp_avg_sq": {}, "main": {}}
    for model_param, main in pairs:
        name, st = names[id(model_param)], o.optimizer.state[main]
        out["exp_avg"][name] = st["exp_avg"].clone()
        out["exp_avg_sq"][name] = st["exp_avg_sq"].clone()
        out["main"][name] = main.detach().float().clone()
    return out


def _in_four_processes(rank, world, root, hf_dir, arch):
    out = {"native": _native_load_of_converted(hf_dir, arch)}
    for name, do, precision in CASES:
        out[name] = _training_round_trip(rank, f"{root}/{name}", hf_dir, arch, do, precision)
    return out


def _native_load_of_converted(hf_dir, arch):
    """The converter's torch_dist checkpoint (written for TP=1) loaded by megatron-core itself
    at TP2 x PP2 vs the per-rank checkpoint re-sharded by load_model_shards: [names that
    differ]."""
    _, native = _model_at(arch, 2, 2)
    dist_format.load_training_checkpoint(hf_dir + "/mc_dist", native)
    ref = _model_at(arch, 2, 2, init=False)[1]
    ck.load_model_shards(hf_dir + "/mc", ref)
    a, b = native[0].module.state_dict(), ref[0].module.state_dict()
    assert sorted(a) == sorted(b)
    return [k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])]


def _training_round_trip(rank, root, hf_dir, arch, do, precision):
    """TP2 x PP2: 2 steps, save (torch_dist + per-rank model files), 1 more step; then
    TP1 x DP4: load, 1 step. Returns what the test compares."""
    import torch.distributed as dist

    from megatron_patch.training.model_setup import build_optimizer

    g = torch.Generator().manual_seed(5)
    data = [torch.randint(0, arch.vocab_size, (GBS, SEQ + 1), generator=g) for _ in range(4)]
    out = {}
    cfg, chunks = _model_at(arch, 2, 2, do=do, precision=precision)
    ck.load_model_shards(hf_dir + "/mc", chunks)
    opt = build_optimizer(chunks, cfg, lr=1e-2, use_distributed_optimizer=do, clip_grad=0.0)
    _train_steps(chunks, opt, cfg, data, 2)
    import random

    import numpy as np
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate(), "rank": rank}
    ck_dist = dist_format.save_training_checkpoint(
        root + "/dist", 2, chunks, opt, common={"args": ck.make_args(arch, 2, 2, "fp32"),
                                                "opt_param_scheduler": {"num_steps": 2}},
        rank_state=rng)
    # the per-rank ('torch') format route for the same weights
    from megatron.core import parallel_state as ps
    if rank == 0:
        ck.begin_save(root + "/torch", 2)
    dist.barrier()
    sd = {k: v for k, v in mapping.to_te_names(chunks[0].module.state_dict()).items()
          if not k.endswith("_extra_state")}
    if ps.get_data_parallel_rank() == 0:
        ck.save_rank_file(ck.checkpoint_file(ck.staging_dir(root + "/torch", 2),
                                             ps.get_tensor_model_parallel_rank(),
                                             ps.get_pipeline_model_parallel_rank(), 2),
                          ck.checkpoint_state([sd], 2, ck.make_args(arch, 2, 2, "fp32")))
    dist.barrier()
    if rank == 0:
        ck.commit_save(root + "/torch", 2)
    dist.barrier()
    if not do:
        out["saved"] = {k: _hf_named(chunks[0], v, arch, 2, 2)
                        for k, v in _adam_state(opt, chunks[0]).items()}
    # same-layout resume restores this rank's own state
    back = dist_format.load_training_checkpoint(root + "/dist", chunks, opt)
    got = back["rank_state"]
    out["rank_state_same_layout"] = (
        got["rank"] == rank and torch.equal(got["torch"], rng["torch"])
        and got["python"] == rng["python"] and (got["numpy"][1] == rng["numpy"][1]).all())
    _train_steps(chunks, opt, cfg, data[2:], 1)
    w = {k: v.detach().clone() for k, v in chunks[0].module.state_dict().items()
         if not k.endswith("_extra_state")}
    out["continued"] = _hf_named(chunks[0], w, arch, 2, 2)
    del opt, chunks

    # TP1 x PP1 x DP4
    cfg, chunks = _model_at(arch, 1, 1, do=do, precision=precision)
    opt = build_optimizer(chunks, cfg, lr=1e-2, use_distributed_optimizer=do, clip_grad=0.0)
    common = dist_format.load_training_checkpoint(root + "/dist", chunks, opt)
    out["common"] = (common["iteration"], common["opt_param_scheduler"], common["rank_state"],
                     common["saved_layout"])
    out["loaded"] = {k: v.detach().clone() for k, v in mapping.to_te_names(
        chunks[0].module.state_dict()).items() if not k.endswith("_extra_state")}
    ref = _model_at(arch, 1, 1, init=False, precision=precision)[1]
    ck.load_model_shards(root + "/torch", ref)
    out["torch_route"] = {k: v.detach().clone() for k, v in mapping.to_te_names(
        ref[0].module.state_dict()).items() if not k.endswith("_extra_state")}
    if not do:
        all_layers = list(range(arch.num_layers))
        out["loaded_state"] = {k: mapping.stage_to_hf_state([v], arch, all_layers, True, True)
                               for k, v in _adam_state(opt, chunks[0]).items()}
    _train_steps(chunks, opt, cfg, data[2:], 1)
    w = {k: v.detach().clone() for k, v in chunks[0].module.state_dict().items()
         if not k.endswith("_extra_state")}
    out["resumed"] = mapping.stage_to_hf_state([w], arch, list(range(arch.num_layers)),
                                               True, True)
    # the same step from the loaded weights with a fresh optimizer: what a resume that lost
    # the Adam moments would give
    cfg, fresh = _model_at(arch, 1, 1, init=False, do=do, precision=precision)
    dist_format.load_training_checkpoint(root + "/dist", fresh)
    fopt = build_optimizer(fresh, cfg, lr=1e-2, use_distributed_optimizer=do, clip_grad=0.0)
    _train_steps(fresh, fopt, cfg, data[2:], 1)
    w = {k: v.detach().clone() for k, v in fresh[0].module.state_dict().items()
         if not k.endswith("_extra_state")}
    out["fresh"] = mapping.stage_to_hf_state([w], arch, list(range(arch.num_layers)), True, True)
    out["dist_dir"] = ck_dist
    return out


@pytest.fixture(scope="module")
def four_process_results(tmp_path_factory):
    """One set of 4 gloo processes for every multi-process check (start-up dominates)."""
    root = tmp_path_factory.mktemp("dist4")
    # vocabulary 300: padded to 384 at TP=1 and to 512 at TP=2
    arch = small_arch("llama3", vocab_size=300)
    hf = root / "hf"
    write_hf_checkpoint(str(hf), arch, seed=2)
    os.environ["TQDM_DISABLE"] = "1"
    assert cli.main(["auto", str(hf), str(hf / "mc"), "1", "1", "false", "false", "false",
                     "fp32"]) == 0
    os.environ["MP_CKPT_FORMAT"] = "torch_dist"
    try:
        assert cli.main(["auto", str(hf), str(hf / "mc_dist"), "1", "1", "false", "false",
                         "false", "fp32"]) == 0
    finally:
        del os.environ["MP_CKPT_FORMAT"]
    res = run_distributed(_in_four_processes, 4, str(root), str(hf), arch, timeout=1200)
    return root, res


@pytest.mark.slow
def test_megatron_core_loads_converted_torch_dist_at_tp2pp2(four_process_results):
    _, res = four_process_results
    assert all(r["native"] == [] for r in res)


@pytest.mark.slow
@pytest.mark.parametrize("case,do,precision", CASES, ids=[c[0] for c in CASES])
def test_training_checkpoint_tp2pp2_resumes_at_tp1(four_process_results, case, do, precision):
    root, results = four_process_results
    res = [r[case] for r in results]
    r0 = res[0]
    assert all(r["rank_state_same_layout"] for r in res)
    assert r0["dist_dir"].endswith("iter_0000002")
    assert ck.find_checkpoint(str(root / case / "dist")).format == "torch_dist"
    # common state back, no per-rank state across a layout change
    assert r0["common"] == (2, {"num_steps": 2}, None, {"tp": 2, "pp": 2, "dp": 1})
    # the model equals the per-rank format route (saved at TP2 x PP2, re-sharded to TP1)
    assert sorted(r0["loaded"]) == sorted(r0["torch_route"])
    for k, v in r0["loaded"].items():
        assert torch.equal(v, r0["torch_route"][k]), k
    if not do:  # Adam moments (and bf16's fp32 main params), re-sharded, bit for bit
        for kind in ("exp_avg", "exp_avg_sq", "main"):
            saved = {}
            for r in res:  # each PP stage's merged part (both TP ranks return the same)
                saved.update(r["saved"][kind])
            assert sorted(saved) == sorted(r0["loaded_state"][kind])
            for k in saved:
                assert torch.equal(r0["loaded_state"][kind][k], saved[k]), (kind, k)
    # one more step at TP1 x DP4 lands where TP2 x PP2's own next step did (float noise of
    # the other layout), far closer than the same step with the moments lost
    continued = {}
    for r in res:
        continued.update(r["continued"])
    tol = 1e-5 if precision == "fp32" else 1e-2  # bf16: weight rounding of the two layouts
    sq_err = sq_lost = sq_ref = 0.0
    for k, want in continued.items():
        got, fresh, want = r0["resumed"][k].float(), r0["fresh"][k].float(), want.float()
        err = (got - want).norm() / want.norm()
        assert err < tol, (k, err.item())
        sq_err += (got - want).norm().item() ** 2
        sq_lost += (fresh - want).norm().item() ** 2
        sq_ref += want.norm().item() ** 2
    # over the whole model (a single bf16 norm vector's rounding can rival its step)
    err, lost = (sq_err / sq_ref) ** 0.5, (sq_lost / sq_ref) ** 0.5
    assert lost > 10 * max(err, 1e-9), (err, lost)
