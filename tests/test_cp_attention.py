"""Context-parallel core attention against full-sequence attention computed in float64 by
torch's SDPA (an independent reference): outputs and q/k/v gradients at CP=2 and CP=4 in 4
gloo processes, GQA, both kernel paths; the layout is megatron's (rank r holds chunks r and
2*CP-1-r), and a rank whose two chunks are swapped, or K/V put back in the wrong order, is
caught. Single-process: the CPU kernel path equals masked SDPA and keeps no O(S^2) tensor
for the backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mp_utils import run_distributed

S, B, NP, NG, D = 48, 2, 4, 2, 16   # S divisible by 2*CP for CP = 2, 4 (and 3 chunks/rank)


def _full_inputs():
    g = torch.Generator().manual_seed(11)
    q = torch.randn(S, B, NP, D, generator=g)
    k = torch.randn(S, B, NG, D, generator=g)
    v = torch.randn(S, B, NG, D, generator=g)
    grad_out = torch.randn(S, B, NP * D, generator=g)
    return q, k, v, grad_out


def _reference(q, k, v, grad_out):
    """Causal attention over the whole sequence in float64: output [S, B, NP*D] and grads."""
    q, k, v = (t.double().permute(1, 2, 0, 3).requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = out.permute(2, 0, 1, 3).reshape(S, B, NP * D)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out.double())
    back = [t.permute(2, 0, 1, 3) for t in (dq, dk, dv)]
    return out.detach(), back


def _rank_positions(cp: int, r: int, swap: bool = False) -> torch.Tensor:
    """The sequence positions CP rank r holds, written out from the layout's definition."""
    c = S // (2 * cp)
    first, second = torch.arange(r * c, (r + 1) * c), \
        torch.arange((2 * cp - 1 - r) * c, (2 * cp - r) * c)
    return torch.cat([second, first] if swap else [first, second])


def _rel(a, b) -> float:
    return float((a.double() - b).abs().max() / b.abs().max())


def _run_cp(attn, q, k, v, grad_out, idx):
    ql, kl, vl = (t[idx].clone().requires_grad_() for t in (q, k, v))
    out = attn(ql, kl, vl, None)
    dq, dk, dv = torch.autograd.grad(out, (ql, kl, vl), grad_out[idx])
    return out.detach(), (dq, dk, dv)


def _worker(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.utils import get_batch_on_this_cp_rank

    from llama_fixtures import small_arch
    from megatron_patch import parallel
    from megatron_patch.models.llama.config import ParallelSettings, transformer_config
    from megatron_patch.transformer import cp_attention as cpa

    q, k, v, grad_out = _full_inputs()
    ref_out, ref_grads = _reference(q, k, v, grad_out)
    arch = small_arch()  # 4 heads, 2 KV heads, head dim 16
    res = {}
    gathered = []
    real_gather = cpa.gather_from_sequence_parallel_region

    def spy_gather(x, *a, **kw):
        gathered.append(tuple(x.shape))
        return real_gather(x, *a, **kw)
    cpa.gather_from_sequence_parallel_region = spy_gather
    for cp in (4, 2):
        parallel.initialize_model_parallel(cp=cp)
        r = ps.get_context_parallel_rank()
        cfg = transformer_config(arch, ParallelSettings(cp=cp))
        attn = cpa.ContextParallelAttention(cfg, 1, AttnMaskType.causal, "self")
        idx = _rank_positions(cp, r)
        # the data path splits batches the same way (megatron's utility)
        split = get_batch_on_this_cp_rank({"tokens": torch.arange(S)[None]})["tokens"][0]
        out = {"split_matches": torch.equal(split, idx)}
        got, grads = _run_cp(attn, q, k, v, grad_out, idx)
        out["cpu"] = [_rel(got, ref_out[idx])] + [_rel(g, rg[idx])
                                                  for g, rg in zip(grads, ref_grads)]
        # the kernel path CUDA takes (SDPA's causal_lower_right bias), here on the CPU
        real = cpa.prefix_causal_attention
        cpa.prefix_causal_attention = lambda q_, k_, v_, p, s: cpa.lower_right_sdpa(q_, k_, v_, s)
        try:
            got, grads = _run_cp(attn, q, k, v, grad_out, idx)
        finally:
            cpa.prefix_causal_attention = real
        out["sdpa_bias"] = [_rel(got, ref_out[idx])] + [_rel(g, rg[idx])
                                                        for g, rg in zip(grads, ref_grads)]
        # negative controls: this rank's chunks swapped; K/V chunks left in gather order
        got, _ = _run_cp(attn, q, k, v, grad_out, _rank_positions(cp, r, swap=True))
        out["swapped"] = _rel(got, ref_out[idx])
        real_order = cpa.chunk_order
        cpa.chunk_order = lambda n: list(range(2 * n))
        try:
            got, _ = _run_cp(attn, q, k, v, grad_out, idx)
        finally:
            cpa.chunk_order = real_order
        out["gather_order"] = _rel(got, ref_out[idx])
        res[cp] = out
    res["gathered"] = gathered
    return res


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 4, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 4])
def test_cp_attention_equals_full_sequence(results, cp):
    for r in results:
        res = r[cp]
        assert res["split_matches"]
        for path in ("cpu", "sdpa_bias"):
            out_err, dq_err, dk_err, dv_err = res[path]
            assert max(out_err, dq_err, dk_err, dv_err) < 1e-5, (cp, path, res[path])


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 4])
def test_wrong_chunk_order_is_caught(results, cp):
    """The comparison is sensitive to the layout: swapping a rank's two chunks, or not
    putting the gathered K/V back into sequence order, gives clearly different outputs
    (on every rank: each rank's late chunk sees a wrong set of earlier tokens)."""
    for r in results:
        assert r[cp]["swapped"] > 1e-2 and r[cp]["gather_order"] > 1e-2, r[cp]


@pytest.mark.slow
def test_gqa_gathers_kv_heads_not_query_heads(results):
    """One all-gather per call, of K and V with their NG heads (2*NG), never NP heads."""
    for r in results:
        assert r["gathered"] and all(shape[2] == 2 * NG for shape in r["gathered"]), \
            r["gathered"]


def test_cpu_prefix_kernel_equals_masked_sdpa():
    """The CPU path (two flash calls merged by log-sum-exp, custom backward) and the SDPA
    bias path against SDPA with an explicit lower-right causal mask in float64, with and
    without a prefix, GQA, fp32 and bf16."""
    from megatron_patch.transformer.cp_attention import lower_right_sdpa, \
        prefix_causal_attention
    g = torch.Generator().manual_seed(2)
    for prefix, c, dtype, tol in ((0, 8, torch.float32, 1e-5), (24, 8, torch.float32, 1e-5),
                                  (5, 7, torch.float32, 1e-5), (24, 8, torch.bfloat16, 2e-2)):
        q, k, v = (torch.randn(2, n, s, D, generator=g).to(dtype).requires_grad_()
                   for n, s in ((NP, c), (NG, prefix + c), (NG, prefix + c)))
        go = torch.randn(2, NP, c, D, generator=g).to(dtype)
        keep = torch.ones(c, prefix + c, dtype=torch.bool).tril(prefix)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=keep, enable_gqa=True)
        ref_grads = torch.autograd.grad(ref, (qd, kd, vd), go.double())
        for fn in (prefix_causal_attention, lambda *a: lower_right_sdpa(*a[:3], a[4])):
            out = fn(q, k, v, prefix, D ** -0.5)
            grads = torch.autograd.grad(out, (q, k, v), go)
            assert out.dtype == dtype and _rel(out, ref) < tol
            assert all(_rel(a, b) < tol for a, b in zip(grads, ref_grads))


def test_cpu_prefix_kernel_keeps_no_mask_for_backward():
    """What the CPU path saves for the backward is O(c + prefix) per head, not a
    [c, prefix + c] mask: the point of context parallelism is memory."""
    from megatron_patch.transformer.cp_attention import prefix_causal_attention
    c, prefix = 512, 1536
    q = torch.randn(1, NP, c, D, requires_grad=True)
    k = torch.randn(1, NG, prefix + c, D, requires_grad=True)
    v = torch.randn(1, NG, prefix + c, D, requires_grad=True)
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        prefix_causal_attention(q, k, v, prefix, D ** -0.5)
    mask_bytes = c * (prefix + c) * 4
    inputs = sum(t.numel() * 4 for t in (q, k, v))
    assert sum(storages.values()) < inputs + mask_bytes // 4, (storages, mask_bytes)
