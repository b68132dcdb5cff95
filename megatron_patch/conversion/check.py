"""CHECK: per-layer parity between transformers' LlamaForCausalLM and megatron_patch's
megatron-core model (built by ``build_llama``: our rotary frequencies, never HF's buffers).

Both models run the same token ids: a real English prompt (tokenised with the checkpoint's
tokenizer when it has one whose ids fit the vocabulary, else its UTF-8 bytes), repeated up
to ``original_max_position_embeddings + 32`` tokens for llama3-style rope scaling so that
positions beyond the original context are exercised. Compared points: embedding output,
every decoder layer's output, final norm, logits; with llama3 scaling each point also gets
a row for the positions beyond the original context alone.

Pass criterion per row (tolerance printed in the table header), on the float64 difference:
    rel = ||mcore - hf|| / ||hf|| <= rtol   and   cosine(mcore, hf) >= min_cos
fp32 is tight (both sides compute the same math; measured diffs are ~0); bf16/fp16 allow
twice the measured rounding drift of two different kernels for the model's width and depth
(``tolerance``).

Two ways to compute the table: ``parity`` here runs both whole models (memory for two full
models; kept as the reference the tests hold the other against), ``stream_check`` walks them
a layer at a time in bounded memory and gives the same numbers -- the converter runs that.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_patch.models.llama.arch import LlamaArch

PROMPT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can "
    "of oil and a notebook in which he recorded the weather, the ships that passed, and the "
    "birds that rested on the railing. Over thirty years the notebook grew into a shelf of "
    "volumes, and scientists later used his careful observations to study how storms along "
    "the northern coast had changed. He never thought of himself as a researcher; he simply "
    "believed that anything worth watching was worth writing down, and that a record kept "
    "honestly, day after day, would one day be useful to someone he would never meet."
)
MAX_PROMPT_TOKENS = 128


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    min_cos: float


# fp32: the two models do the same math, differences are summation-order noise (~1e-6;
# measured 0.0 on CPU). A conversion bug (wrong head order, swapped gate/up, missing rope
# scaling) gives rel ~ 0.1-1; one layer 5% off gives ~0.02-0.03 at that layer.
TOLERANCES = {"fp32": Tolerance(1e-4, 0.99999)}

# bf16/fp16: two kernels' rounding, compounded over the layers. Largest rel over all points
# (tools/check_drift.py: CPU, random init, 128-token prompt; tiny = the 4 generations' tiny
# presets, hidden 128 x 4 layers, the largest of the four):
#   hidden x layers   tiny    128x16  128x64  256x16  256x64  1024x4  1024x16 2048x8  4096x4
#   bf16              6.6e-3  8.8e-3  1.4e-2  9.4e-3  1.4e-2  9.3e-3  1.3e-2  1.6e-2  2.1e-2
#   fp16              8.0e-4          1.2e-3          1.8e-3          1.7e-3          2.3e-3
# It grows with depth (~layers^0.3) and, faster as models widen, with width (~hidden^0.2
# to ^0.6). Every measurement lies under the envelope DRIFT * sqrt(hidden / 128) *
# (layers / 4)^(1/3) (each factor at least 1; closest: 0.85 of it at 128x64), and the
# tolerance is twice that envelope: a correct conversion passes with >= 2x margin, while
# on the tiny presets a layer 5% off (rel ~0.02-0.03 there) fails. Shapes past 4096 wide or
# 64 deep, and trained weights, are extrapolation.
DRIFT = {"bf16": 6.6e-3, "fp16": 8.1e-4}
DRIFT_MARGIN = 2.0


def tolerance(precision: str, arch: LlamaArch) -> Tolerance:
    """The pass criterion of a ``precision`` check of ``arch`` (see DRIFT above)."""
    if precision not in DRIFT:
        return TOLERANCES[precision]
    envelope = (DRIFT[precision] * max(1.0, arch.hidden_size / 128) ** 0.5
                * max(1.0, arch.num_layers / 4) ** (1 / 3))
    rtol = float(f"{DRIFT_MARGIN * envelope:.3g}")
    # an error of relative size rtol orthogonal to the reference lowers the cosine by
    # ~rtol^2 / 2: allow twice that
    return Tolerance(rtol, float(f"{1 - rtol ** 2:.6g}"))


@dataclass
class Row:
    point: str
    positions: str
    max_abs: float
    rel: float
    cos: float
    ok: bool


@dataclass
class CheckResult:
    precision: str
    tolerance: Tolerance
    prompt: str
    seq_len: int
    rows: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def first_failure(self) -> Optional[Row]:
        return next((r for r in self.rows if not r.ok), None)

    def header(self) -> list:
        t = self.tolerance
        return [f"parity check: {self.precision}, pass if rel <= {t.rtol:g} and cosine >= "
                f"{t.min_cos:g}; {self.seq_len} tokens ({self.prompt})",
                f"{'point':<24} {'positions':<12} {'max abs diff':>13} {'rel diff':>10} "
                f"{'cosine':>10}  result"]

    @staticmethod
    def row_line(r: Row) -> str:
        return (f"{r.point:<24} {r.positions:<12} {r.max_abs:>13.3e} {r.rel:>10.3e} "
                f"{r.cos:>10.7f}  {'ok' if r.ok else 'FAIL'}")

    def summary(self) -> str:
        f = self.first_failure
        return ("CHECK PASSED" if f is None else
                f"CHECK FAILED: first failing point: {f.point} (positions {f.positions}): "
                f"rel {f.rel:.3e}, cosine {f.cos:.7f}")

    def add(self, point: str, positions: str, stats: tuple) -> Row:
        max_abs, rel, cos = stats
        t = self.tolerance
        row = Row(point, positions, max_abs, rel, cos, rel <= t.rtol and cos >= t.min_cos)
        self.rows.append(row)
        return row

    def table(self) -> str:
        return "\n".join(self.header() + [self.row_line(r) for r in self.rows] + [self.summary()])


# ---- prompt --------------------------------------------------------------------------
def prompt_ids(arch: LlamaArch, tokenizer_dir: Optional[str] = None) -> tuple:
    """(ids, description): the prompt tokenised, at least 64 and at most 128 tokens, then
    repeated beyond the original context for llama3 rope scaling."""
    ids, how = None, None
    if tokenizer_dir:
        ids, how = _tokenize(tokenizer_dir)
        if ids is not None and (len(ids) < 64 or max(ids) >= arch.vocab_size):
            ids = None
    if ids is None:  # a model whose vocabulary cannot hold its tokenizer's ids (tests)
        ids, how = [3 + b % (arch.vocab_size - 3) for b in PROMPT.encode()], "UTF-8 bytes"
    ids = ids[:MAX_PROMPT_TOKENS]
    desc = f"real text prompt of {len(ids)} tokens via {how}"
    orig = _original_context(arch)
    if orig is not None:
        n = orig + 32
        ids = (ids * (n // len(ids) + 1))[:max(n, len(ids))]
        desc += f", repeated to pass original context {orig}"
    return ids, desc


def _tokenize(path: str):
    try:
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
            return tok.encode(PROMPT, add_special_tokens=False).ids, "tokenizer.json"
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
            return sp.encode(PROMPT), "tokenizer.model"
    except Exception as e:  # a broken tokenizer must not hide a weight problem
        return None, f"tokenizer failed: {e}"
    return None, None


def _original_context(arch: LlamaArch) -> Optional[int]:
    s = arch.rope_scaling or {}
    if s.get("rope_type") == "llama3" and os.environ.get("MP_CHECK_LONG", "1") != "0":
        return int(s.get("original_max_position_embeddings", 8192))
    return None


# ---- capture -------------------------------------------------------------------------
def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def capture_hf(model, ids: torch.Tensor, vocab: int) -> list:
    """[(point, [batch, seq, ...] float tensor)] for an HF LlamaForCausalLM."""
    inner = model.model
    mods = [("embedding", inner.embed_tokens)]
    mods += [(f"decoder layer {i}", layer) for i, layer in enumerate(inner.layers)]
    mods += [("final norm", inner.norm)]
    out, hooks = {}, []
    for name, mod in mods:
        hooks.append(mod.register_forward_hook(
            lambda m, a, o, name=name: out.__setitem__(name, _first(o).detach())))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return [(n, out[n]) for n, _ in mods] + [("logits", logits[..., :vocab])]


def capture_mcore(model, ids: torch.Tensor, vocab: int) -> list:
    """Same points for a megatron-core GPTModel (TP=PP=1); [s, b, h] -> [b, s, h]."""
    mods = [("embedding", model.embedding)]
    mods += [(f"decoder layer {i}", layer) for i, layer in enumerate(model.decoder.layers)]
    mods += [("final norm", model.decoder.final_layernorm)]
    out, hooks = {}, []
    for name, mod in mods:
        hooks.append(mod.register_forward_hook(
            lambda m, a, o, name=name: out.__setitem__(name, _first(o).detach().transpose(0, 1))))
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    try:
        with torch.no_grad():
            logits = model(ids, pos, None)
    finally:
        for h in hooks:
            h.remove()
    return [(n, out[n]) for n, _ in mods] + [("logits", logits[..., :vocab])]


class Stats:
    """Running float64 sums behind one table row, so a point can be compared piece by piece
    (vocabulary chunks of the logits) with the numbers a one-shot comparison gives:
    max |test - ref|, ||test - ref||, ||ref||, ||test||, ref . test."""
    CHUNK = 1 << 22  # elements converted to float64 at a time (32 MiB per operand)

    def __init__(self):
        self.max_abs, self.diff2, self.ref2, self.test2, self.dot = 0.0, 0.0, 0.0, 0.0, 0.0
        self.finite = True

    def add(self, ref: torch.Tensor, test: torch.Tensor) -> "Stats":
        if ref.shape != test.shape:
            raise ValueError(f"compared shapes differ: {tuple(ref.shape)} vs {tuple(test.shape)}")
        ref, test = ref.reshape(-1), test.reshape(-1)
        for i in range(0, ref.numel(), self.CHUNK):
            a, b = ref[i:i + self.CHUNK].double(), test[i:i + self.CHUNK].double()
            self.finite &= bool(torch.isfinite(a).all() and torch.isfinite(b).all())
            d = b - a
            self.max_abs = max(self.max_abs, d.abs().max().item())
            self.diff2 += d.square().sum().item()
            self.ref2 += a.square().sum().item()
            self.test2 += b.square().sum().item()
            self.dot += a.dot(b).item()
        return self

    def result(self) -> tuple:
        """(max abs diff, relative L2 diff, cosine)."""
        if not self.finite:
            return self.max_abs, float("inf"), 0.0
        rel = self.diff2 ** 0.5 / max(self.ref2 ** 0.5, 1e-30)
        cos = self.dot / (max(self.ref2 ** 0.5, 1e-30) * max(self.test2 ** 0.5, 1e-30))
        return self.max_abs, rel, cos


def compare(ref: torch.Tensor, test: torch.Tensor) -> tuple:
    return Stats().add(ref, test).result()


def position_spans(arch: LlamaArch, seq_len: int) -> list:
    """[(label, slice of positions)]: all positions, and for llama3 rope scaling those
    beyond the original context alone."""
    spans = [(f"0-{seq_len - 1}", slice(None))]
    orig = _original_context(arch)
    if orig is not None and seq_len > orig:
        spans.append((f">={orig}", slice(orig, None)))
    return spans


def parity(hf_model, mcore_model, arch: LlamaArch, precision: str,
           tokenizer_dir: Optional[str] = None) -> CheckResult:
    ids_list, desc = prompt_ids(arch, tokenizer_dir)
    ids = torch.tensor([ids_list])
    tol = tolerance(precision, arch)
    ref = capture_hf(hf_model, ids, arch.vocab_size)
    got = dict(capture_mcore(mcore_model, ids, arch.vocab_size))
    res = CheckResult(precision, tol, desc, ids.shape[1])
    for point, r in ref:
        g = got[point]
        for label, sl in position_spans(arch, ids.shape[1]):
            res.add(point, label, compare(r[:, sl], g[:, sl]))
    return res


# ---- models --------------------------------------------------------------------------
def ensure_single_process_parallel() -> None:
    """megatron-core needs parallel_state even for one process: a 1-rank gloo group with
    TP=PP=1 (kept if the caller already set exactly that up)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_patch import parallel
    from megatron_patch.backends import active_backend
    if not dist.is_initialized():
        # an explicit free port, not MASTER_PORT in os.environ: child processes inherit the
        # environment and would collide with this process's listening store
        dist.init_process_group(active_backend().dist_backend, rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{parallel.free_port()}")
    if dist.get_world_size() != 1:
        raise RuntimeError("the parity check runs in one process (world size 1)")
    if not ps.model_parallel_is_initialized() or \
            ps.get_tensor_model_parallel_world_size() != 1 or \
            ps.get_pipeline_model_parallel_world_size() != 1:
        parallel.initialize_model_parallel(1, 1)


def build_mcore(arch: LlamaArch, state: dict, precision: str):
    """A TP=PP=1 megatron_patch model holding ``state`` (megatron names, unsharded)."""
    from megatron_patch.checkpoint.load import load_into
    from megatron_patch.models.llama.config import ParallelSettings, transformer_config
    from megatron_patch.models.llama.provider import build_llama

    ensure_single_process_parallel()
    cfg = transformer_config(arch, ParallelSettings(1, 1), precision,
                             perform_initialization=False)  # every weight is loaded next
    model = build_llama(arch, cfg, pre_process=True, post_process=True).eval()
    load_into(model, state, strict=True)
    return model


def hf_config(arch: LlamaArch):
    from transformers import LlamaConfig
    return LlamaConfig(**{k: v for k, v in arch.to_hf_config().items() if k != "architectures"})


def hf_from_dir(path: str, precision: str):
    """transformers' model as users load it: weights in ``precision``, rope buffers as
    transformers keeps them (float32; casting the module would round them too)."""
    from transformers import LlamaForCausalLM

    from megatron_patch.models.llama.config import DTYPES
    dtype = DTYPES[precision]
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    if next(model.parameters()).dtype != dtype:  # transformers < 4.56 ignores dtype=
        model.to(dtype)
    return model.eval()
