"""The one check of a parallel layout (TP, PP, VP, CP, uneven first stage) against a Llama
architecture and, when known, the number of processes and the sequence length.

The launcher's plan, the converter, inference and evaluation all call ``check_layout``
before any process starts or any file is written, so a layout error reads the same
everywhere: ``NAME=value is not valid: <why>``. Standard library only.
"""
from __future__ import annotations

from typing import Optional

from .arch import LlamaArch


class LayoutError(ValueError):
    """A layout that cannot hold the model; the message is the one line shown to the user."""


def _bad(name: str, value, why: str) -> LayoutError:
    return LayoutError(f"{name}={value!r} is not valid: {why}")


def stage_layer_counts(num_layers: int, pp: int, vp: Optional[int] = None,
                       pp0_layers: Optional[int] = None) -> list:
    """Layers per model chunk, in pipeline order (PP x VP chunks), as megatron-core places
    them; raises LayoutError when they do not split."""
    if pp0_layers is not None and pp > 1:
        if vp:
            raise _bad("MP_PP0_LAYERS", pp0_layers, "cannot be combined with MP_VP")
        rest = num_layers - pp0_layers
        if pp0_layers < 1 or rest < 1:
            raise _bad("MP_PP0_LAYERS", pp0_layers, f"must be between 1 and {num_layers - 1} "
                       f"(the model has {num_layers} layers; the other stages need some)")
        if pp0_layers < 1 or rest < pp - 1 or rest % (pp - 1):
            raise _bad("MP_PP0_LAYERS", pp0_layers, f"the other {rest} of {num_layers} layers "
                       f"must split evenly over PP-1={pp - 1} stages")
        return [pp0_layers] + [rest // (pp - 1)] * (pp - 1)
    if pp > num_layers:
        raise _bad("PP", pp, f"must not exceed the model's {num_layers} layers")
    chunks = pp * (vp or 1)
    if num_layers % chunks:
        if vp:
            raise _bad("MP_VP", vp, f"PP={pp} x MP_VP={vp} must divide the model's "
                       f"{num_layers} layers")
        raise _bad("PP", pp, f"must divide the model's {num_layers} layers (or set "
                   "MP_PP0_LAYERS for an uneven first stage)")
    return [num_layers // chunks] * chunks


def check_layout(arch: LlamaArch, tp: int = 1, pp: int = 1, cp: int = 1,
                 vp: Optional[int] = None, pp0_layers: Optional[int] = None,
                 world_size: Optional[int] = None, seq_len: Optional[int] = None,
                 sequence_parallel: bool = False, what: str = "",
                 seq_name: str = "SEQ_LEN") -> Optional[int]:
    """Raise LayoutError for a layout that cannot hold ``arch``; return the data-parallel
    size when ``world_size`` is given. ``what`` names the model and ``seq_name`` the
    sequence-length argument in messages."""
    model = f" ({what})" if what else ""
    for name, n in (("TP", tp), ("PP", pp), ("CP", cp)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise _bad(name, n, "must be an integer >= 1")
    for n, things in ((arch.num_key_value_heads, "key/value heads"),
                      (arch.num_attention_heads, "attention heads"),
                      (arch.ffn_hidden_size, "FFN size")):
        if n % tp:
            raise _bad("TP", tp, f"must divide the model's {n} {things}{model}")
    if vp is not None and pp == 1:
        raise _bad("MP_VP", vp, "virtual pipeline stages need PP > 1")
    if pp0_layers is not None and pp == 1:
        raise _bad("MP_PP0_LAYERS", pp0_layers, "an uneven first pipeline stage needs PP > 1")
    stage_layer_counts(arch.num_layers, pp, vp, pp0_layers)
    if seq_len is not None:
        if cp > 1 and seq_len % (2 * cp):
            raise _bad(seq_name, seq_len, f"must be a multiple of 2 x CP = {2 * cp} (context "
                       "parallelism splits each sequence into 2 x CP chunks)")
        if sequence_parallel and seq_len % (tp * cp):
            raise _bad(seq_name, seq_len, f"must be a multiple of TP x CP = {tp * cp} with "
                       "SP=true")
    if world_size is None:
        return None
    mp = tp * pp * cp
    if world_size % mp:
        raise LayoutError(f"TP={tp} x PP={pp} x CP={cp} = {mp} does not divide the "
                          f"{world_size} processes")
    return world_size // mp
