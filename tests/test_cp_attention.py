"""Context-parallel core attention against attention computed in float64 by torch's SDPA
(an independent reference).

Here, single-process: the CPU kernel path (and the SDPA-bias path) equals masked SDPA and
keeps no O(S^2) tensor for the backward; Transformer Engine gets MP_CP_COMM_TYPE.
``attention_checks`` runs in the 4 gloo processes of tests/test_cp_training.py (CP=2 and
CP=4 against full-sequence attention, wrong chunk orders caught); the tests judging it
are there."""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
    return float((a.detach().double() - b).abs().max() / b.abs().max())


def _run_cp(attn, q, k, v, grad_out, idx):
    ql, kl, vl = (t[idx].clone().requires_grad_() for t in (q, k, v))
    out = attn(ql, kl, vl, None)
    dq, dk, dv = torch.autograd.grad(out, (ql, kl, vl), grad_out[idx])
    return out.detach(), (dq, dk, dv)


def attention_checks() -> dict:
    """Run in each of 4 gloo processes (the world of tests/test_cp_training.py, which shares
    its start-up): for CP=4 and CP=2, this rank's output and q/k/v gradients against the
    float64 reference on both kernel paths, the negative controls, and the shapes the
    all-gather was given. Returns relative errors; the tests judge them."""
    from megatron_patch.transformer import cp_attention as cpa
    q, k, v, grad_out = _full_inputs()
    ref = _reference(q, k, v, grad_out)
    gathered = []
    real_gather = cpa.gather_from_sequence_parallel_region

    def spy_gather(x, *a, **kw):
        gathered.append(tuple(x.shape))
        return real_gather(x, *a, **kw)
    cpa.gather_from_sequence_parallel_region = spy_gather
    try:
        res = {cp: _check_cp_size(cp, (q, k, v, grad_out), ref) for cp in (4, 2)}
    finally:
        cpa.gather_from_sequence_parallel_region = real_gather
    res["gathered"] = gathered
    return res


def _check_cp_size(cp: int, inputs, ref) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_patch import parallel
    from megatron_patch.models.llama import LlamaArch
    from megatron_patch.models.llama.config import ParallelSettings, transformer_config
    from megatron_patch.transformer import cp_attention as cpa
    ref_out, ref_grads = ref
    parallel.initialize_model_parallel(cp=cp)
    r = ps.get_context_parallel_rank()
    arch = LlamaArch(hidden_size=NP * D, num_layers=1, num_attention_heads=NP,
                     num_key_value_heads=NG, ffn_hidden_size=128, vocab_size=128,
                     max_position_embeddings=S, rope_theta=10000.0, norm_eps=1e-5)
    attn = cpa.ContextParallelAttention(transformer_config(arch, ParallelSettings(cp=cp)), 1,
                                        AttnMaskType.causal, "self")
    idx = _rank_positions(cp, r)

    def errors(positions):
        out, grads = _run_cp(attn, *inputs, positions)
        return [_rel(out, ref_out[idx])] + [_rel(g, rg[idx]) for g, rg in zip(grads, ref_grads)]

    # the data path splits batches the same way (megatron's utility)
    split = get_batch_on_this_cp_rank({"tokens": torch.arange(S)[None]})["tokens"][0]
    res = {"split_matches": torch.equal(split, idx), "cpu": errors(idx)}
    real_attend, real_order = cpa.prefix_causal_attention, cpa.chunk_order
    try:
        # the kernel path CUDA takes (SDPA's causal_lower_right bias), here on the CPU
        cpa.prefix_causal_attention = lambda q, k, v, p, s: cpa.lower_right_sdpa(q, k, v, s)
        res["sdpa_bias"] = errors(idx)
        cpa.prefix_causal_attention = real_attend
        # negative controls: this rank's two chunks swapped; K/V left in gather order
        res["swapped"] = errors(_rank_positions(cp, r, swap=True))[0]
        cpa.chunk_order = lambda n: list(range(2 * n))
        res["gather_order"] = errors(idx)[0]
    finally:
        cpa.prefix_causal_attention, cpa.chunk_order = real_attend, real_order
    return res


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


def test_te_gets_cp_comm_type(monkeypatch):
    """Where Transformer Engine imports on CUDA, its attention runs CP with the launcher's
    MP_CP_COMM_TYPE (TE itself is not installed here: only the wiring is checked)."""
    from megatron_patch.backends import cuda
    monkeypatch.setattr(cuda, "te_available", lambda: True)
    backend = cuda.CudaBackend()
    assert backend.training_overrides(True, "bf16", "a2a")["cp_comm_type"] == "a2a"
    assert "cp_comm_type" not in backend.training_overrides(True, "bf16")
