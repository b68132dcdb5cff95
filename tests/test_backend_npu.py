"""npu backend wiring, tested with a fake torch_npu (tests/fake_torch_npu) whose kernels are
CPU reference implementations with the real argument layouts and constraints. There is no
Ascend hardware here: this proves the wiring (patch targets, layouts, masks, sparse modes,
the ``[0]`` outputs), not the real kernels.

In this process the fake kernels are only put into sys.modules for one test at a time
(monkeypatch); everything that needs the whole fake (torch.npu, hccl, transfer_to_npu, all of
which cannot be undone) runs in a child process, so the rest of the suite keeps the cpu
backend.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import megatron_patch  # noqa: F401  (the cpu backend stays active for the whole suite)
from megatron_patch.backends import BackendUnavailableError, resolve_choice, select_backend
from megatron_patch.backends.npu import NpuBackend
from megatron_patch.backends.registry import resolve
from megatron_patch.transformer import npu_ops

FAKE_DIR = Path(__file__).parent / "fake_torch_npu"
REPO = Path(__file__).resolve().parents[1]


def _load(name):
    """A module of the fake package loaded on its own (no side effects on torch)."""
    spec = importlib.util.spec_from_file_location(f"_fake_torch_npu_{name}",
                                                  FAKE_DIR / "torch_npu" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ops():
    return _load("_ops")


@pytest.fixture
def fake(monkeypatch, ops):
    """``import torch_npu`` yields the fake kernels for this test only."""
    stub = types.ModuleType("torch_npu")
    for name in ("npu_rms_norm", "npu_rotary_mul", "npu_swiglu", "npu_fusion_attention"):
        setattr(stub, name, getattr(ops, name))
    monkeypatch.setitem(sys.modules, "torch_npu", stub)
    ops.CALLS.clear()
    return ops


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# ---------------------------------------------------------------- (a) fake kernels vs float64

def test_fake_rms_norm_matches_float64(ops):
    x, g = _rand(5, 3, 64), _rand(64, seed=1)
    y, rstd = ops.npu_rms_norm(x, g, epsilon=1e-5)
    x64 = x.double()
    r64 = 1.0 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-5)
    assert rstd.shape == (5, 3, 1) and y.dtype == x.dtype
    torch.testing.assert_close(rstd.double(), r64, rtol=1e-5, atol=0)
    torch.testing.assert_close(y.double(), x64 * r64 * g.double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gamma dtype"):
        ops.npu_rms_norm(x, g.double())


@pytest.mark.parametrize("mode", ["half", "interleave"])
def test_fake_rotary_mul_matches_float64(ops, mode):
    x = _rand(6, 2, 3, 8)
    ang = _rand(6, 1, 1, 8, seed=1)
    cos, sin = torch.cos(ang), torch.sin(ang)
    out = ops.npu_rotary_mul(x, cos, sin, rotary_mode=mode).double()
    x64, c, s = x.double(), cos.double(), sin.double()
    ref = torch.empty_like(x64)
    for d in range(8):  # pairwise rotation written out element by element
        if mode == "half":
            partner, sign = (d + 4, -1.0) if d < 4 else (d - 4, 1.0)
        else:
            partner, sign = (d + 1, -1.0) if d % 2 == 0 else (d - 1, 1.0)
        ref[..., d] = x64[..., d] * c[..., d] + sign * x64[..., partner] * s[..., d]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="broadcast"):
        ops.npu_rotary_mul(x, cos[:3].expand(3, 2, 1, 8), sin[:3].expand(3, 2, 1, 8))


def test_fake_swiglu_matches_float64(ops):
    x = _rand(4, 3, 10)
    a, b = x.double()[..., :5], x.double()[..., 5:]
    torch.testing.assert_close(ops.npu_swiglu(x, dim=-1).double(), a / (1 + torch.exp(-a)) * b,
                               rtol=1e-6, atol=1e-7)
    a0, b0 = x.double()[:2], x.double()[2:]
    torch.testing.assert_close(ops.npu_swiglu(x, dim=0).double(), a0 / (1 + torch.exp(-a0)) * b0,
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="contiguous"):
        ops.npu_swiglu(x.transpose(0, 1))


def _attention64(q, k, v, scale, allowed):
    """q [b, n, sq, d], k/v [b, nkv, sk, d]; allowed [sq, sk] or [b, 1, sq, sk]; head h reads
    K/V head h // (n // nkv). Loops per (batch, head), float64."""
    q, k, v = q.double(), k.double(), v.double()
    b, n, sq, _ = q.shape
    rep = n // k.shape[1]
    allowed = allowed.expand(b, 1, sq, k.shape[2])
    out = torch.zeros(b, n, sq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(n):
            s = q[bi, h] @ k[bi, h // rep].T * scale
            s = s.masked_fill(~allowed[bi, 0], float("-inf"))
            out[bi, h] = torch.softmax(s, dim=-1) @ v[bi, h // rep]
    return out


def _sbh(t):  # [b, n, s, d] -> [s, b, n * d]
    return t.permute(2, 0, 1, 3).reshape(t.shape[2], t.shape[0], -1)


def test_fake_fusion_attention_matches_float64(ops):
    b, n, nkv, s, d = 2, 4, 2, 70, 16
    q, k, v = _rand(b, n, s, d), _rand(b, nkv, s, d, seed=1), _rand(b, nkv, s, d, seed=2)
    scale = d ** -0.5
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    comp = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
    res = ops.npu_fusion_attention(_sbh(q), _sbh(k), _sbh(v), n, "SBH", atten_mask=comp,
                                   scale=scale, pre_tockens=65536, next_tockens=0, sparse_mode=2)
    assert len(res) == 7 and res[0].shape == (s, b, n * d)
    ref = _attention64(q, k, v, scale, causal)
    torch.testing.assert_close(res[0].double(), _sbh(ref), rtol=1e-5, atol=1e-5)
    # the other layouts are the same computation
    bsh = ops.npu_fusion_attention(*(t.transpose(0, 1) for t in (_sbh(q), _sbh(k), _sbh(v))), n,
                                   "BSH", atten_mask=comp, scale=scale, sparse_mode=2)[0]
    bnsd = ops.npu_fusion_attention(q, k, v, n, "BNSD", atten_mask=comp, scale=scale,
                                    sparse_mode=2)[0]
    torch.testing.assert_close(bsh.transpose(0, 1), res[0])
    torch.testing.assert_close(_sbh(bnsd), res[0])
    # rightDownCausal: 5 queries at the end of 70 keys
    out3 = ops.npu_fusion_attention(q[:, :, -5:], k, v, n, "BNSD", atten_mask=comp,
                                    scale=scale, sparse_mode=3)[0]
    torch.testing.assert_close(out3.double(), _attention64(q[:, :, -5:], k, v, scale, causal[-5:]),
                               rtol=1e-5, atol=1e-5)
    # defaultMask: explicit B1SS mask plus a pre/next_tockens band
    keep = torch.rand(b, 1, s, s, generator=torch.Generator().manual_seed(3)) > 0.3
    keep[..., torch.arange(s), torch.arange(s)] = True  # no fully masked row
    i, j = torch.arange(s).unsqueeze(1), torch.arange(s).unsqueeze(0)
    band = (i - j <= 5) & (j - i <= 2)
    out0 = ops.npu_fusion_attention(q, k, v, n, "BNSD", atten_mask=~keep, scale=scale,
                                    pre_tockens=5, next_tockens=2, sparse_mode=0)[0]
    torch.testing.assert_close(out0.double(), _attention64(q, k, v, scale, keep & band),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="compressed"):  # causal modes want the 2048 mask
        ops.npu_fusion_attention(q, k, v, n, "BNSD", atten_mask=~causal, scale=scale,
                                 sparse_mode=2)


# ------------------------------------------------- (b) npu replacements vs the CPU reference

def test_rmsnorm_replacement_matches_cpu_path(fake):
    from megatron_patch.transformer.norm import RMSNorm
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        cfg = types.SimpleNamespace(params_dtype=dtype, sequence_parallel=False)
        norm = RMSNorm(cfg, 64, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(_rand(64, seed=1))
        x = _rand(64, 2, 64, dtype=dtype)
        torch.testing.assert_close(npu_ops.rmsnorm_forward(norm, x), norm(x), rtol=tol, atol=tol)
    assert fake.CALLS["npu_rms_norm"] == 2


def _rope_freqs(s, dim, base=10000.0):
    """[s, 1, 1, dim] like megatron's RotaryEmbedding (non-interleaved: freqs repeated)."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    f = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    return torch.cat((f, f), dim=-1)[:, None, None, :]


def test_rotary_replacement_matches_cpu_path(fake):
    from megatron.core.models.common.embeddings import rope_utils
    original = rope_utils._apply_rotary_pos_emb_bshd
    fused = npu_ops.fused_rotary_bshd(original)
    t = _rand(64, 2, 4, 32)
    for freqs, mscale in ((_rope_freqs(64, 32), 1.0), (_rope_freqs(64, 32), 0.7),
                          (_rope_freqs(64, 16), 1.0)):  # last: partial rotary
        torch.testing.assert_close(fused(t, freqs, mscale=mscale),
                                   original(t, freqs, mscale=mscale), rtol=1e-6, atol=1e-6)
    assert fake.CALLS["npu_rotary_mul"] == 3
    # interleaved rope is left to megatron's own code
    torch.testing.assert_close(fused(t, _rope_freqs(64, 32), rotary_interleaved=True),
                               original(t, _rope_freqs(64, 32), rotary_interleaved=True))
    assert fake.CALLS["npu_rotary_mul"] == 3


def test_swiglu_replacement_matches_cpu_path(fake):
    x, bias = _rand(64, 2, 96), _rand(96, seed=1)
    # what MLP's unfused branch computes: activation_func(first half) * second half
    for b, y in ((None, x), (bias, x + bias)):
        x_glu, x_linear = torch.chunk(y, 2, dim=-1)
        torch.testing.assert_close(npu_ops.bias_swiglu(x, b), F.silu(x_glu) * x_linear,
                                   rtol=1e-6, atol=1e-6)
    assert fake.CALLS["npu_swiglu"] == 2
    with pytest.raises(NotImplementedError):
        npu_ops.bias_swiglu(x, None, fp8_input_store=True)


class _OneRank:
    def size(self):
        return 1

    def rank(self):
        return 0


def _attention_pair(mask_type):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig
    from megatron_patch.transformer.sdpa_attention import SDPAttention
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                            num_query_groups=2, kv_channels=16, attention_dropout=0.0,
                            hidden_dropout=0.0)
    pg = ProcessGroupCollection()
    pg.tp = _OneRank()
    return [cls(cfg, 1, mask_type, "self", pg_collection=pg).eval()
            for cls in (SDPAttention, npu_ops.NpuFusedAttention)]


def test_attention_replacement_matches_cpu_path(fake, monkeypatch):
    from megatron.core.transformer.enums import AttnMaskType
    seen = []
    kernel = fake.npu_fusion_attention

    def spy(q, k, v, head_num, **kw):
        seen.append((tuple(q.shape), tuple(k.shape), head_num, kw["input_layout"],
                     kw["sparse_mode"]))
        return kernel(q, k, v, head_num, **kw)

    monkeypatch.setattr(sys.modules["torch_npu"], "npu_fusion_attention", spy)
    sq, b = 72, 2
    q, k, v = _rand(sq, b, 4, 16), _rand(sq, b, 2, 16, seed=1), _rand(sq, b, 2, 16, seed=2)
    ref, npu = _attention_pair(AttnMaskType.causal)
    torch.testing.assert_close(npu(q, k, v, None), ref(q, k, v, None), rtol=1e-5, atol=1e-5)
    assert seen[-1] == ((sq, b, 64), (sq, b, 32), 4, "SBH", 2)
    # decoding with a KV cache: the last 4 positions attend to all 72 keys before them
    torch.testing.assert_close(npu(q[-4:], k, v, None), ref(q[-4:], k, v, None),
                               rtol=1e-5, atol=1e-5)
    assert seen[-1][-1] == 3
    # explicit masks (megatron: True = masked), with and without causality
    pad = torch.zeros(b, 1, sq, sq, dtype=torch.bool)
    pad[1, ..., 60:] = True  # the second sequence has 12 padded keys
    for mask_type in (AttnMaskType.padding, AttnMaskType.padding_causal):
        ref, npu = _attention_pair(mask_type)
        torch.testing.assert_close(npu(q, k, v, pad), ref(q, k, v, pad), rtol=1e-5, atol=1e-5)
        assert seen[-1][-1] == 0
    assert len(seen) == 4


def test_rng_replacements_use_the_npu_generator(monkeypatch):
    monkeypatch.setattr(torch, "npu", _load("npu"), raising=False)
    state = torch.get_rng_state()
    torch.rand(3)
    npu_ops.set_rng_state(state)
    first = torch.rand(3)
    torch.set_rng_state(state)
    assert torch.equal(first, torch.rand(3))
    assert torch.equal(npu_ops.get_rng_state(), torch.get_rng_state())


# ------------------------------------------- (c) tiny Llama under the npu backend, end to end

def test_tiny_llama_under_npu_backend_matches_hf_and_cpu_path(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from megatron_patch.models.llama import get_preset

    vocab, seq = 512, 80
    arch = get_preset("llama3", "tiny")
    arch.vocab_size = vocab
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(**{k: v for k, v in arch.to_hf_config().items() if k != "architectures"})
    hf = LlamaForCausalLM(hf_cfg).float().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    labels = torch.randint(0, vocab, (2, seq), generator=g)
    with torch.no_grad():
        hf_logits = hf(ids).logits
    torch.save(dict(generation="llama3", vocab_size=vocab, hf_state=hf.state_dict(), ids=ids,
                    labels=labels), tmp_path / "in.pt")

    env = dict(os.environ, MEGATRON_PATCH_BACKEND="auto", OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([str(FAKE_DIR), str(REPO),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(FAKE_DIR / "npu_llama_check.py"),
                           str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = torch.load(tmp_path / "out.pt")

    # auto picked npu; hccl, torch.device("npu"), fused attention and the fused gate in use
    assert (r["backend"], r["dist_backend"], r["device1"]) == ("npu", "hccl", "npu:1")
    assert r["core_attention"] == "NpuFusedAttention"
    assert r["fused_gate"] is True and r["ref_fused_gate"] is False
    # every kernel ran where expected: two forwards of 4 layers
    layers = arch.num_layers
    assert r["calls"] == {"npu_rms_norm": 2 * (2 * layers + 1), "npu_rotary_mul": 2 * 2 * layers,
                          "npu_fusion_attention": 2 * layers, "npu_swiglu": 2 * layers}
    assert r["calls_after_remove"] == {}  # removed patches: the reference never hit the fake

    torch.testing.assert_close(r["npu_logits"][..., :vocab], hf_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(r["npu_logits"], r["ref_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(r["npu_loss"], r["ref_loss"], rtol=1e-6, atol=0)
    assert r["npu_grads"].keys() == r["ref_grads"].keys() and len(r["ref_grads"]) > 20
    for name, grad in r["ref_grads"].items():
        torch.testing.assert_close(r["npu_grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------ (d) the error without torch_npu

def test_npu_without_torch_npu_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # `import torch_npu` fails
    with pytest.raises(BackendUnavailableError) as err:
        resolve_choice("npu")
    assert "torch_npu" in str(err.value) and "CANN" in str(err.value)
    monkeypatch.setenv("MEGATRON_PATCH_BACKEND", "npu")
    with pytest.raises(BackendUnavailableError, match="CANN"):
        select_backend()
    assert resolve_choice("auto") != "npu"


def test_torch_npu_without_device_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(
        is_available=lambda: False, device_count=lambda: 0), raising=False)
    assert not NpuBackend.available()
    with pytest.raises(BackendUnavailableError) as err:
        resolve_choice("npu")
    assert "no Ascend device" in str(err.value) and "CANN" in str(err.value)
    assert resolve_choice("auto") != "npu"


# --------------------------------------------------- (e) remove() restores every original

def test_registry_apply_and_remove_restore_originals():
    from megatron.core.transformer import mlp
    from megatron_patch.transformer.norm import RMSNorm

    backend = NpuBackend()  # registering imports no torch_npu
    targets = [p.target for p in backend.registry]
    assert set(targets) == {
        "megatron_patch.transformer.norm.RMSNorm.forward",
        "megatron.core.models.common.embeddings.rope_utils._apply_rotary_pos_emb_bshd",
        "megatron.core.transformer.mlp.bias_swiglu_impl",
        "megatron.core.tensor_parallel.random._get_cuda_rng_state",
        "megatron.core.tensor_parallel.random._set_cuda_rng_state",
        # the optimizer-offload repairs every backend registers (backends/offload_fixes.py)
        "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
        "_build_model_and_main_param_groups",
        "megatron.core.optimizer.optimizer_config.is_te_min_version"}
    def raw(target):  # a classmethod is a new bound object on every getattr
        owner, attr, value = resolve(target)
        return owner.__dict__[attr] if isinstance(owner, type) else value

    before = {t: raw(t) for t in targets}
    try:
        backend.registry.apply()
        backend.registry.apply()  # idempotent
        now = {t: raw(t) for t in targets}
        assert all(now[t] is not before[t] for t in targets)
        assert RMSNorm.forward is npu_ops.rmsnorm_forward
        assert mlp.bias_swiglu_impl is npu_ops.bias_swiglu
        rope = now["megatron.core.models.common.embeddings.rope_utils._apply_rotary_pos_emb_bshd"]
        assert rope.__wrapped__ is before[
            "megatron.core.models.common.embeddings.rope_utils._apply_rotary_pos_emb_bshd"]
    finally:
        backend.registry.remove()
    assert all(raw(t) is before[t] for t in targets)
