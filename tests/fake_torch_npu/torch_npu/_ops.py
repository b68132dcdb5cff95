"""CPU reference versions of the torch_npu kernels megatron_patch calls, with the real
argument layouts and checks of the constraints the real kernels impose (a wiring mistake
raises here instead of passing silently). Calls are counted in CALLS.

Importable on its own (no side effects), so in-process tests can use these ops without
installing the fake device.
"""
from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

CALLS: collections.Counter = collections.Counter()
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
COMPRESSED = 2048  # size of the compressed causal mask sparse_mode 2/3/4 expect


def _check(cond, msg):
    if not cond:
        raise ValueError("fake torch_npu: " + msg)


def npu_rms_norm(self, gamma, epsilon=1e-6):
    """-> (y, rstd); statistics in fp32, y in the input dtype, rstd fp32 with the normalised
    dims kept as size 1."""
    CALLS["npu_rms_norm"] += 1
    _check(self.dtype in _FLOATS, f"npu_rms_norm dtype {self.dtype}")
    _check(gamma.dtype == self.dtype, f"gamma dtype {gamma.dtype} != input dtype {self.dtype}")
    nd = gamma.dim()
    _check(tuple(self.shape[-nd:]) == tuple(gamma.shape), "gamma must match trailing dims")
    x = self.float()
    rstd = torch.rsqrt(x.pow(2).mean(dim=tuple(range(-nd, 0)), keepdim=True) + epsilon)
    return (x * rstd * gamma.float()).to(self.dtype), rstd


def _rotate(x, mode):
    if mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]  # interleave
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def npu_rotary_mul(input, r1, r2, rotary_mode="half"):
    """output = r1 * x + r2 * rotate(x); all three 4-D, r1/r2 broadcast to x."""
    CALLS["npu_rotary_mul"] += 1
    _check(rotary_mode in ("half", "interleave"), f"rotary_mode {rotary_mode!r}")
    _check(input.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, "x, r1, r2 must be 4-D")
    _check(r1.shape == r2.shape, "r1 and r2 shapes differ")
    _check(input.shape[-1] % 2 == 0 and r1.shape[-1] == input.shape[-1], "D mismatch / odd")
    _check(all(r in (1, x) for r, x in zip(r1.shape, input.shape)),
           f"r1 {tuple(r1.shape)} does not broadcast to x {tuple(input.shape)}")
    _check(r1.dtype == input.dtype == r2.dtype, "dtypes of x, r1, r2 differ")
    return input * r1 + _rotate(input, rotary_mode) * r2


def npu_swiglu(input, dim=-1):
    """silu(A) * B with A, B the first and second halves of ``input`` along ``dim``."""
    CALLS["npu_swiglu"] += 1
    _check(input.is_contiguous(), "npu_swiglu needs a contiguous input")
    _check(input.shape[dim] % 2 == 0, "split dim must be even")
    a, b = input.chunk(2, dim=dim)
    return (F.silu(a.float()) * b.float()).to(input.dtype)


def _to_bnsd(t, layout, heads=None, head_dim=None):
    """-> [B, N, S, D]; heads/head_dim are needed for the H layouts."""
    if layout == "BNSD":
        return t
    if layout == "BSND":
        return t.permute(0, 2, 1, 3)
    if layout == "BSH":
        b, s, h = t.shape
        return t.reshape(b, s, h // head_dim, head_dim).permute(0, 2, 1, 3)
    s, b, h = t.shape  # SBH
    return t.reshape(s, b, h // head_dim, head_dim).permute(1, 2, 0, 3)


def _from_bnsd(o, layout):
    b, n, s, d = o.shape
    if layout == "BNSD":
        return o
    if layout == "BSND":
        return o.permute(0, 2, 1, 3)
    if layout == "BSH":
        return o.permute(0, 2, 1, 3).reshape(b, s, n * d)
    return o.permute(2, 0, 1, 3).reshape(s, b, n * d)


def _masked(atten_mask, sparse_mode, pre, nxt, sq, sk, device):
    """True = masked, broadcastable to [B, N, Sq, Sk]."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    if sparse_mode in (2, 3):
        _check(atten_mask is not None and atten_mask.dtype == torch.bool
               and tuple(atten_mask.shape) == (COMPRESSED, COMPRESSED)
               and torch.equal(atten_mask, torch.ones_like(atten_mask).triu(1)),
               f"sparse_mode={sparse_mode} needs the compressed {COMPRESSED}x{COMPRESSED} bool "
               "mask (True above the diagonal)")
        offset = 0 if sparse_mode == 2 else sk - sq  # leftUp / rightDown causal
        return j > i + offset
    _check(sparse_mode in (0, 1), f"sparse_mode={sparse_mode} is not emulated")
    masked = torch.zeros(sq, sk, dtype=torch.bool, device=device)
    if atten_mask is not None:
        _check(atten_mask.dtype in (torch.bool, torch.uint8), "atten_mask must be bool/uint8")
        _check(atten_mask.dim() in (2, 4) and tuple(atten_mask.shape[-2:]) == (sq, sk),
               f"atten_mask shape {tuple(atten_mask.shape)}: want SS/11SS/B1SS/BNSS")
        masked = masked | atten_mask.bool()
    else:
        _check(sparse_mode == 0, "sparse_mode=1 needs atten_mask")
    if sparse_mode == 0:  # band from pre/next_tockens
        masked = masked | (i - j > pre) | (j - i > nxt)
    return masked


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None,
                         padding_mask=None, atten_mask=None, scale=1.0, keep_prob=1.0,
                         pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                         sparse_mode=0, gen_mask_parallel=True, sync=False):
    """softmax(scale * QK^T, masked) V with GQA. Returns the kernel's 7-tuple:
    (out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)."""
    CALLS["npu_fusion_attention"] += 1
    for name, val in (("pse", pse), ("padding_mask", padding_mask), ("prefix", prefix),
                      ("actual_seq_qlen", actual_seq_qlen), ("actual_seq_kvlen", actual_seq_kvlen)):
        if val is not None:
            raise NotImplementedError(f"fake torch_npu: {name} is not emulated")
    _check(input_layout in ("BSH", "SBH", "BSND", "BNSD"), f"input_layout {input_layout!r}")
    _check(query.dtype == key.dtype == value.dtype and query.dtype in _FLOATS, "q/k/v dtypes")
    _check(key.shape == value.shape, "key and value shapes differ")
    if input_layout in ("BSH", "SBH"):
        _check(query.dim() == 3 and key.dim() == 3, f"{input_layout} wants 3-D q/k/v")
        _check(query.shape[-1] % head_num == 0, "head_num does not divide H")
        d = query.shape[-1] // head_num
        _check(key.shape[-1] % d == 0, "K/V hidden size is not a multiple of D")
        q, k, v = (_to_bnsd(t, input_layout, head_dim=d) for t in (query, key, value))
    else:
        _check(query.dim() == 4, f"{input_layout} wants 4-D q/k/v")
        q, k, v = (_to_bnsd(t, input_layout) for t in (query, key, value))
        _check(q.shape[1] == head_num, "head_num != N of query")
    n, nkv = q.shape[1], k.shape[1]
    _check(n % nkv == 0, f"query heads {n} not a multiple of K/V heads {nkv}")
    if nkv != n:  # GQA: adjacent query heads share one K/V head
        k = k.repeat_interleave(n // nkv, dim=1)
        v = v.repeat_interleave(n // nkv, dim=1)
    sq, sk = q.shape[2], k.shape[2]
    masked = _masked(atten_mask, sparse_mode, pre_tockens, next_tockens, sq, sk, q.device)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(masked, float("-inf"))
    smax = scores.amax(dim=-1, keepdim=True)
    probs = torch.exp(scores - smax.clamp_min(torch.finfo(torch.float32).min))
    ssum = probs.sum(dim=-1, keepdim=True)
    probs = torch.where(ssum > 0, probs / ssum.clamp_min(1e-30), 0.0)  # fully masked row -> 0
    if keep_prob < 1.0:
        probs = F.dropout(probs, p=1.0 - keep_prob)
    out = _from_bnsd(torch.matmul(probs, v.float()).to(query.dtype), input_layout)
    stats = (smax.expand(*smax.shape[:-1], 8), ssum.expand(*ssum.shape[:-1], 8))
    return out, stats[0], stats[1], torch.empty(0, dtype=query.dtype), 0, 0, 0
