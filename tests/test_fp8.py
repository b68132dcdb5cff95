"""PR=fp8 without Transformer Engine: megatron's parallel linears compute in float8 through
torchao (emulated float8 matmuls on the CPU), and fp8 is never a silent bf16 run.

In-process:
- a routed ColumnParallelLinear/RowParallelLinear gives the float64 product of the inputs
  quantised as the hybrid format prescribes (E4M3 activations and weights, E5M2 output
  gradients, one scale per tensor from its amax) -- forward, input gradient and weight
  gradient -- through exactly three float8 matmuls, and clearly not the bf16 product;
- routing covers the decoder's four linears per layer, leaves the output layer in bf16,
  changes no parameter or state-dict entry, and is idempotent;
- gradient-accumulation fusion is refused; PR=fp8 with neither TE nor torchao is one line
  from the argument check, and the npu backend refuses it.
Two gloo processes (slow): at TP=2 (and TP=2+SP) a routed column -> row linear pair equals
its float64 construction from both ranks' shards (the input gradient is the sum of the ranks'
float8 partial products: megatron's communication kept); TP=1 (DP=2), TP=2 and TP=2+SP train
20 iterations in fp8 within
2 % of the bf16 losses (and not equal to them) with the counted float8 matmuls; an fp8
checkpoint loads into a bf16 run and back with identical weights, holds the same tensors
as a bf16 checkpoint, and the converter exports it (CHECK passes).
"""
from __future__ import annotations

import glob
import os

import pytest
import torch

from megatron_patch.transformer import fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _quantised(t: torch.Tensor, dtype) -> torch.Tensor:
    """Tensorwise fp8 quantise-dequantise in float64: scale = max(dtype) / amax(t)."""
    t = t.double()
    scale = torch.finfo(dtype).max / t.abs().max()
    q = (t * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    return q.double() / scale


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture()
def mm_calls(monkeypatch):
    """Counts torchao's float8 matmuls (the aten.mm handler of its float8 tensor)."""
    from torchao.float8.float8_ops import FLOAT8_OPS_TABLE
    op = torch.ops.aten.mm.default
    inner, calls = FLOAT8_OPS_TABLE[op], []

    def counting(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)
    monkeypatch.setitem(FLOAT8_OPS_TABLE, op, counting)
    return calls


def _linear_config(**kw):
    from megatron.core.transformer import TransformerConfig
    return TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                             params_dtype=torch.bfloat16, bf16=True, add_bias_linear=False,
                             use_cpu_initialization=True, **kw)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_float8_linear_matches_float64_reference(mp1, mm_calls, kind):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    cfg = _linear_config()
    init = torch.nn.init.normal_
    if kind == "column":
        lin = ColumnParallelLinear(64, 96, config=cfg, init_method=init, bias=False,
                                   gather_output=False)
    else:
        lin = RowParallelLinear(64, 96, config=cfg, init_method=init, bias=False,
                                input_is_parallel=True, skip_bias_add=True)
    model = torch.nn.ModuleDict({"proj": lin})
    assert fp8.route_parallel_linears_to_float8(model, fp8.float8_config(emulate=True)) == ["proj"]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, 64, generator=g).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(8, 2, 96, generator=g).to(torch.bfloat16)
    y, _ = lin(x)
    y.backward(dy)
    assert len(mm_calls) == 3  # output, input gradient, weight gradient

    w = lin.weight.detach()
    x2, dy2 = x.detach().reshape(-1, 64), dy.reshape(-1, 96)
    exact = {"y": x2.double() @ w.double().t(), "dx": dy2.double() @ w.double(),
             "dw": dy2.double().t() @ x2.double()}
    ref = {"y": _quantised(x2, E4M3) @ _quantised(w, E4M3).t(),
           "dx": _quantised(dy2, E5M2) @ _quantised(w, E4M3),
           "dw": _quantised(dy2, E5M2).t() @ _quantised(x2, E4M3)}
    got = {"y": y.detach().reshape(-1, 96), "dx": x.grad.reshape(-1, 64), "dw": lin.weight.grad}
    for k in ("y", "dx", "dw"):
        fp8_error = _rel(ref[k], exact[k])     # what float8 costs: percent level
        assert fp8_error > 0.01, (k, fp8_error)
        # the routed layer computes the float8 product (up to its bf16 output rounding),
        # far closer to it than to the exact one
        assert _rel(got[k], ref[k]) < fp8_error / 10, (k, _rel(got[k], ref[k]), fp8_error)


def test_routing_covers_decoder_linears_only_and_keeps_state(mp1, mm_calls):
    from llama_fixtures import small_arch
    from megatron_patch.models.llama.config import transformer_config
    from megatron_patch.models.llama.provider import build_llama
    arch = small_arch(layers=2)
    model = build_llama(arch, transformer_config(arch, precision="bf16"))
    before = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    config = fp8.float8_config(emulate=True)
    names = fp8.route_parallel_linears_to_float8(model, config)
    expected = [f"decoder.layers.{i}.{m}" for i in range(2) for m in (
        "self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
        "mlp.linear_fc2")]
    assert sorted(names) == sorted(expected)
    assert fp8.route_parallel_linears_to_float8(model, config) == names  # idempotent
    after = {k: v for k, v in model.state_dict().items() if v is not None}
    assert sorted(after) == sorted(before)
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k])
               for k in before)
    ids = torch.randint(0, arch.vocab_size, (1, 16))
    with torch.no_grad():
        model(ids, torch.arange(16)[None], None)
    assert len(mm_calls) == len(expected)  # one float8 matmul per routed linear, none twice


def test_gradient_accumulation_fusion_is_refused(mp1):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    lin = ColumnParallelLinear(64, 64, config=_linear_config(), init_method=torch.nn.init.normal_,
                               bias=False)
    lin.gradient_accumulation_fusion = True  # as megatron sets it from the config (needs apex)
    with pytest.raises(fp8.Fp8Unavailable, match="gradient_accumulation_fusion"):
        fp8.route_parallel_linears_to_float8(torch.nn.ModuleDict({"l": lin}),
                                             fp8.float8_config(emulate=True))


def test_fp8_refused_in_one_line_without_te_and_torchao(monkeypatch, tmp_path):
    from megatron_patch.training import arguments
    from megatron_patch.training.config import ConfigError
    monkeypatch.setattr(arguments, "_importable", lambda name: False)
    args = ["dsw", "tiny", 1, 1, "1e-5", "1e-6", 64, 64, "fp8", 1, 1, 1, "false", "false", "true",
            "false", "false", "false", 10, "x", "x", "none", 64, 0, str(tmp_path / "out")]
    with pytest.raises(ConfigError) as e:
        arguments.build_config([str(a) for a in args], "llama3", env={}, check_paths=False)
    msg = str(e.value)
    assert "\n" not in msg and "PR='fp8'" in msg and "torchao" in msg and "Transformer Engine" in msg


def test_backends_refuse_fp8_they_cannot_run(monkeypatch):
    from megatron_patch.backends.cpu import CpuBackend
    from megatron_patch.backends.npu import NpuBackend
    with pytest.raises(fp8.Fp8Unavailable, match="npu"):
        NpuBackend.fp8_path(None)
    monkeypatch.setattr(fp8, "torchao_missing", lambda: "torchao is not installed")
    with pytest.raises(fp8.Fp8Unavailable, match="torchao is not installed"):
        CpuBackend().fp8_path()
    # the trainer turns it into its one-line configuration error
    from megatron_patch.training import setup
    from megatron_patch.training.config import ConfigError
    with pytest.raises(ConfigError, match="torchao"):
        setup._fp8_path(CpuBackend())


# ---- training in two gloo processes ---------------------------------------------------------
ITERS, GBS, SEQ = 20, 2, 64
# name: (TP, SP, precisions); TP=1 runs with DP=2. TP=2+SP is compared with TP=2 bf16 (SP
# changes where the sequence is split, not the bf16 math).
RUNS = {"tp1": (1, False, ("bf16", "fp8")), "tp2": (2, False, ("bf16", "fp8")),
        "tp2_sp": (2, True, ("fp8",))}


def _cfg(w, out, tp, pr, sp=False, load=None):
    from megatron_patch.training.arguments import build_config
    args = ["dsw", "auto", 1, GBS, "1e-3", "1e-4", SEQ, SEQ, pr, tp, 1, 1, str(sp).lower(),
            "false", "true", "false", "false", "false", 1000, w.corpus, w.corpus, w.release,
            ITERS * GBS * SEQ, 0, out]
    cfg = build_config([str(a) for a in args], "llama2", env={}).replace(eval_iters=0)
    return cfg if load is None else cfg.replace(checkpoint={"load": load})


def _weights(chunks) -> dict:
    return {k: v.detach().clone() for c in chunks for k, v in c.module.state_dict().items()
            if v is not None and not k.endswith("_extra_state")}


def _tp2_mlp(sp: bool) -> dict:
    """A routed ColumnParallelLinear -> RowParallelLinear pair at TP=2 (with or without
    sequence parallelism): this rank's shards, inputs, intermediate and gradients."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_patch import parallel
    parallel.initialize_model_parallel(tp=2)
    rank = torch.distributed.get_rank()
    cfg = _linear_config(tensor_model_parallel_size=2, sequence_parallel=sp)
    init = torch.nn.init.normal_
    col = ColumnParallelLinear(64, 96, config=cfg, init_method=init, bias=False,
                               gather_output=False)
    row = RowParallelLinear(96, 64, config=cfg, init_method=init, bias=False,
                            input_is_parallel=True, skip_bias_add=True)
    fp8.route_parallel_linears_to_float8(torch.nn.ModuleDict({"col": col, "row": row}),
                                         fp8.float8_config(emulate=True))
    g = torch.Generator().manual_seed(0)  # the same full x and dy on both ranks
    x_full = torch.randn(8, 2, 64, generator=g).to(torch.bfloat16)
    dy_full = torch.randn(8, 2, 64, generator=g).to(torch.bfloat16)
    x = (x_full.chunk(2)[rank] if sp else x_full).clone().requires_grad_()
    dy = dy_full.chunk(2)[rank] if sp else dy_full
    h, _ = col(x)
    h.retain_grad()
    y, _ = row(h)
    y.backward(dy)
    return {k: v.detach().clone() for k, v in dict(
        x_full=x_full, dy_full=dy_full, wc=col.weight, wr=row.weight, h=h, y=y, dx=x.grad,
        dh=h.grad, dwc=col.weight.grad, dwr=row.weight.grad).items()}


def _fp8_training(rank, world, root, out):
    from torchao.float8.float8_ops import FLOAT8_OPS_TABLE

    from train_helpers import World
    from megatron_patch.training.loop import train
    from megatron_patch.training.setup import setup
    op = torch.ops.aten.mm.default
    inner, calls = FLOAT8_OPS_TABLE[op], []
    FLOAT8_OPS_TABLE[op] = lambda *a, **k: calls.append(1) or inner(*a, **k)
    w, res, runs = World(root), {}, {}
    res["mlp"] = {sp: _tp2_mlp(sp) for sp in (False, True)}
    for name, (tp, sp, precisions) in RUNS.items():
        for pr in precisions:
            calls.clear()
            run = train(_cfg(w, os.path.join(out, f"{name}_{pr}"), tp, pr, sp), log_to_file=False)
            runs[name, pr] = run
            res[name, pr] = {"losses": [h["loss"] for h in run.history], "fp8_mm": len(calls)}
    # checkpoints across precisions: the fp8 run's into a bf16 run, the bf16 run's into fp8
    for src, pr in ((("tp2", "fp8"), "bf16"), (("tp2", "bf16"), "fp8")):
        log = []
        loaded = setup(_cfg(w, os.path.join(out, f"load_{src[1]}_into_{pr}"), 2, pr,
                            load=runs[src].cfg.checkpoint_dir), log=log.append)
        a, b = _weights(runs[src].chunks), _weights(loaded.chunks)
        res["load", src[1], pr] = {
            "same_weights": sorted(a) == sorted(b) and all(
                a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a),
            "fp8_line": any("fp8 via torchao" in line for line in log)}
    res["ckpt_dirs"] = {pr: runs["tp2", pr].cfg.checkpoint_dir for pr in ("bf16", "fp8")}
    return res


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mp_utils import run_distributed
    from train_helpers import make_world
    world = make_world(str(tmp_path_factory.getbasetemp() / "train_world"))
    out = str(tmp_path_factory.mktemp("fp8_runs"))
    return world, run_distributed(_fp8_training, 2, world.root, out, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_float8_linears_keep_megatrons_communication(trained, sp):
    """Built by hand from both ranks' shards, float64: the column layer's input gradient is
    the SUM over ranks of its float8 partial products (the all-reduce, or with SP the
    reduce-scatter after the all-gathered input), the row layer's output the sum of its
    partial products (megatron's all-reduce / reduce-scatter around the float8 matmul)."""
    _, results = trained
    r0, r1 = (r["mlp"][sp] for r in results)
    x, dy = r0["x_full"].reshape(-1, 64), r0["dy_full"].reshape(-1, 64)
    h = [r["h"].reshape(-1, 48) for r in (r0, r1)]      # column output shards (full sequence)
    dh = [r["dh"].reshape(-1, 48) for r in (r0, r1)]
    y = _quantised(h[0], E4M3) @ _quantised(r0["wr"], E4M3).t() + \
        _quantised(h[1], E4M3) @ _quantised(r1["wr"], E4M3).t()
    dx = _quantised(dh[0], E5M2) @ _quantised(r0["wc"], E4M3) + \
        _quantised(dh[1], E5M2) @ _quantised(r1["wc"], E4M3)
    got_y = torch.cat([r0["y"], r1["y"]]) if sp else r0["y"]
    got_dx = torch.cat([r0["dx"], r1["dx"]]) if sp else r0["dx"]
    assert _rel(got_y.reshape(-1, 64), y) < 0.01
    assert _rel(got_dx.reshape(-1, 64), dx) < 0.01
    for i, r in enumerate((r0, r1)):
        assert _rel(r["h"].reshape(-1, 48), _quantised(x, E4M3) @ _quantised(r["wc"], E4M3).t()) < 0.01
        assert _rel(r["dwc"], _quantised(dh[i], E5M2).t() @ _quantised(x, E4M3)) < 0.01
        assert _rel(r["dh"].reshape(-1, 48), _quantised(dy, E5M2) @ _quantised(r["wr"], E4M3)) < 0.01
        assert _rel(r["dwr"], _quantised(dy, E5M2).t() @ _quantised(h[i], E4M3)) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_fp8_loss_tracks_bf16(trained, name):
    _, results = trained
    tp = RUNS[name][0]
    bf16_name = "tp2" if name == "tp2_sp" else name
    for r in results:
        ref, got = r[bf16_name, "bf16"]["losses"], r[name, "fp8"]["losses"]
        assert len(got) == ITERS and ref[-1] < ref[0] - 0.3  # it trains
        worst = max(abs(a - b) / b for a, b in zip(got, ref))
        print(f"{name}: worst |fp8 - bf16| / bf16 over {ITERS} iterations = {worst:.4%}")
        assert worst < 0.02, (name, worst, got, ref)
        assert got != ref  # float8 changes the numbers: not a silent bf16 run
        # 3 float8 matmuls (output, input grad, weight grad) per decoder linear (4 per layer,
        # 4 layers) per micro-batch; micro-batches per rank = GBS / data-parallel size
        micro = GBS // (2 // tp)
        assert r[name, "fp8"]["fp8_mm"] == ITERS * micro * 3 * 4 * 4, r[name, "fp8"]["fp8_mm"]
        assert r[bf16_name, "bf16"]["fp8_mm"] == 0


@pytest.mark.slow
def test_fp8_checkpoint_loads_into_bf16_and_back(trained):
    _, results = trained
    for r in results:
        assert r["load", "fp8", "bf16"] == {"same_weights": True, "fp8_line": False}
        assert r["load", "bf16", "fp8"] == {"same_weights": True, "fp8_line": True}


@pytest.mark.slow
def test_fp8_checkpoint_holds_what_bf16_holds_and_exports(trained, tmp_path):
    from train_helpers import model_tensors
    from megatron_patch.conversion import cli
    world, results = trained
    dirs = results[0]["ckpt_dirs"]
    it = f"iter_{ITERS:07d}"
    a, b = (model_tensors(os.path.join(dirs[pr], it)) for pr in ("fp8", "bf16"))
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype == torch.bfloat16 and a[k].shape == b[k].shape for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the two runs trained differently
    rc = cli.main(["auto", dirs["fp8"], str(tmp_path / "hf"), "1", "1", "true", "true", "false",
                   "bf16", world.hf])
    assert rc == 0
    assert glob.glob(str(tmp_path / "hf" / "*.safetensors"))
