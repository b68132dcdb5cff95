"""Meta's original Llama checkpoint folders, read as if they were HF checkpoints.

    params.json             dim, n_layers, n_heads, n_kv_heads, vocab_size (-1 in LLaMA-1/2:
                            then the embedding's rows), multiple_of, ffn_dim_multiplier,
                            norm_eps, rope_theta, use_scaled_rope
    consolidated.NN.pth     one file per model-parallel rank of Meta's own code (1 for 7B/8B,
                            2 for 13B, 8 for 65B/70B); torch.save zip files
    tokenizer.model         sentencepiece (LLaMA-1/2) or tiktoken BPE ranks (Llama-3)

Each model-parallel file holds the rank's slice of every matrix: column-parallel ones (wq,
wk, wv, w1, w3, output) split along dim 0, row-parallel ones (wo, w2) along dim 1, norms
replicated; ``tok_embeddings`` is split along the embedding dim (dim 1) by LLaMA-1/2's
ParallelEmbedding and along the vocabulary (dim 0) by Llama-3's VocabParallelEmbedding, so
its split is read off the shapes. Meta's attention rotates interleaved pairs (2j, 2j+1) of
each q/k head; HF's rotates halves (j, j + d/2), so HF's q_proj/k_proj are Meta's rows
permuted within every head (``_interleaved_to_halves``).

``MetaCheckpoint`` offers HFCheckpoint's reader interface under HF tensor names, so the
converter, its validation and CHECK take it unchanged. Files are opened with the restricted
unpickler of checkpoint/torch_file.py -- no pickled code runs, the guarantee of
``torch.load(weights_only=True)`` -- and a tensor's bytes are read only when it is needed,
so memory holds one tensor (its model-parallel slices) at a time.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch

from megatron_patch.checkpoint.torch_file import LazyTensor, LazyTorchFile
from megatron_patch.models.llama.arch import LlamaArch
from megatron_patch.models.llama.resolve import arch_differences, resolve_arch

from .rowcopy import Located

PARAMS = "params.json"
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")

# HF name suffix -> (Meta name suffix, how the model-parallel slices join)
_LAYER = {
    "input_layernorm.weight": ("attention_norm.weight", None),
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
}
_GLOBAL = {"model.embed_tokens.weight": ("tok_embeddings.weight", "vocab"),
           "model.norm.weight": ("norm.weight", None),
           "lm_head.weight": ("output.weight", 0)}
# (generation, context length) of a params.json, as Meta released them
_CONTEXT = {"llama": 2048, "llama2": 4096, "llama3": 8192, "llama3_1": 131072}


def is_meta_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PARAMS))


def meta_ffn_size(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, times the multiplier, rounded up to
    ``multiple_of`` (each step truncated to int, as Meta's code does)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _interleaved_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from Meta's pair order (2j, 2j+1) to HF's half order (j, j+d/2)."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


class MetaCheckpoint:
    """A Meta checkpoint folder under HF tensor names (HFCheckpoint's reader interface)."""
    format = "meta"

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, PARAMS)) as f:
            params = json.load(f)
        self.params = params.get("model", params)  # some releases nest the model args
        for key in ("dim", "n_layers", "n_heads"):
            if key not in self.params:
                raise ValueError(f"{path}/{PARAMS}: no {key!r}; not a Meta Llama params.json")
        found = sorted((int(m.group(1)), n) for n in os.listdir(path)
                       if (m := _SHARD_RE.match(n)))
        if not found:
            raise FileNotFoundError(f"{path}: {PARAMS} but no consolidated.NN.pth files")
        if [i for i, _ in found] != list(range(len(found))):
            raise FileNotFoundError(f"{path}: consolidated files {[n for _, n in found]} are "
                                    f"not numbered 00..{len(found) - 1:02d}")
        self.files = [LazyTorchFile(os.path.join(path, n)) for _, n in found]
        self.shards = []
        for f in self.files:
            obj = f.obj
            if not isinstance(obj, dict):
                raise ValueError(f"{f.path}: not a Meta state dict")
            self.shards.append({k: v for k, v in obj.items() if isinstance(v, LazyTensor)})
        self.n_heads = self.params["n_heads"]
        self.n_kv_heads = self.params.get("n_kv_heads") or self.n_heads
        self._names = {}  # HF name -> (Meta name, join dim or None or "vocab")
        for hf, (meta, how) in _GLOBAL.items():
            self._names[hf] = (meta, how)
        for i in range(self.params["n_layers"]):
            for hf, (meta, how) in _LAYER.items():
                self._names[f"model.layers.{i}.{hf}"] = (f"layers.{i}.{meta}", how)
        self.meta = {}  # HF name -> (dtype, shape), from the file structure alone
        for hf, (meta, how) in self._names.items():
            if meta in self.shards[0]:
                self.meta[hf] = (self.shards[0][meta].dtype, self._joined_shape(hf))

    # ---- layout -----------------------------------------------------------------------
    def _slices(self, hf: str) -> list:
        meta = self._names[hf][0]
        missing = [f.path for f, sd in zip(self.files, self.shards) if meta not in sd]
        if missing:
            raise KeyError(f"{missing[0]}: tensor {meta} not found")
        return [sd[meta] for sd in self.shards]

    def _join_dim(self, hf: str) -> Optional[int]:
        how = self._names[hf][1]
        if how != "vocab" or len(self.files) == 1:
            return None if how == "vocab" else how
        # LLaMA-1/2 split the embedding dim, Llama-3 the vocabulary
        return 1 if self._slices(hf)[0].shape[1] != self.params["dim"] else 0

    def _joined_shape(self, hf: str) -> tuple:
        parts = self._slices(hf)
        shape = list(parts[0].shape)
        dim = self._join_dim(hf) if len(parts) > 1 else None
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in parts)
        return tuple(shape)

    # ---- HFCheckpoint's interface ---------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def shape(self, name: str) -> tuple:
        return self.meta[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.meta[name][0]

    def nbytes(self, name: str) -> int:
        n = self.dtype(name).itemsize
        for s in self.shape(name):
            n *= s
        return n

    def read(self, names) -> list:
        return [self._read(n) for n in names]

    def _read(self, name: str) -> torch.Tensor:
        if name not in self.meta:
            raise KeyError(f"{self.path}: tensor {name} not found")
        parts = self._slices(name)
        dim = self._join_dim(name)
        t = parts[0].load() if dim is None else torch.cat([p.load() for p in parts], dim=dim)
        if name.endswith("q_proj.weight"):
            t = _interleaved_to_halves(t, self.n_heads)
        elif name.endswith("k_proj.weight"):
            t = _interleaved_to_halves(t, self.n_kv_heads)
        return t

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        dim = self._join_dim(name)
        parts = self._slices(name)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            return self._read(name)[start:stop]
        if dim == 1:  # every slice holds all rows: their columns side by side
            return torch.cat([p.load_rows(start, stop) for p in parts], dim=1)
        if dim is None:
            return parts[0].load_rows(start, stop)
        out, offset = [], 0
        for p in parts:
            n = p.shape[0]
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                out.append(p.load_rows(lo - offset, hi - offset))
            offset += n
        return torch.cat(out)

    def locate(self, name: str):
        """Where the tensor's bytes are (a single, unpermuted, contiguous slice), else None."""
        if name not in self.meta or name.endswith(("q_proj.weight", "k_proj.weight")):
            return None
        if len(self.files) > 1 and self._names[name][1] is not None:  # slices to join
            return None
        lt = self._slices(name)[0]
        loc = lt.file.location(lt)
        return None if loc is None else Located(loc[0], loc[1], lt.dtype, tuple(lt.shape))

    def close(self) -> None:
        for f in self.files:
            f.close()


# ---- the model ------------------------------------------------------------------------------
def _guess_generation(params: dict, vocab: int) -> str:
    if params.get("use_scaled_rope"):
        return "llama3_1"
    if vocab >= 128000:
        return "llama3"
    return "llama2" if float(params.get("norm_eps", 1e-6)) == 1e-5 else "llama"


def meta_arch(ckpt: MetaCheckpoint, model_size: str = "auto") -> LlamaArch:
    """The LlamaArch of a Meta folder: shapes from params.json (vocabulary and FFN width
    checked against the files), generation and context length from MODEL_SIZE when it names
    one, else from the params (scaled rope: Llama-3.1; 128k vocabulary: Llama-3; eps 1e-5:
    Llama-2; else LLaMA-1), rope scaling from ``use_scaled_rope`` (Llama-3.1's constants;
    ``rope_scaling_factor`` when params.json gives one)."""
    p = ckpt.params
    dim, heads = p["dim"], p["n_heads"]
    vocab = ckpt.shape("model.embed_tokens.weight")[0]
    if p.get("vocab_size", -1) not in (-1, vocab):
        raise ValueError(f"{ckpt.path}/{PARAMS}: vocab_size {p['vocab_size']}, but "
                         f"tok_embeddings holds {vocab} rows")
    ffn = meta_ffn_size(dim, p.get("multiple_of", 256), p.get("ffn_dim_multiplier"))
    held = ckpt.shape("model.layers.0.mlp.gate_proj.weight")[0]
    if ffn != held:
        raise ValueError(f"{ckpt.path}/{PARAMS}: dim/multiple_of/ffn_dim_multiplier give a "
                         f"feed-forward width of {ffn}, the weights have {held}")
    if model_size == "auto":
        generation, preset = _guess_generation(p, vocab), None
    else:
        preset = resolve_arch(model_size)  # the preset alone (a Meta folder has no config.json)
        generation = preset.generation
    context = preset.max_position_embeddings if preset else _CONTEXT[generation]
    theta = float(p.get("rope_theta", 10000.0))
    if generation == "llama2" and theta > 10000.0 and preset is None:
        context = 16384  # Code Llama's params (Llama-2 shapes, theta 1e6)
    scaling = None
    if p.get("use_scaled_rope"):
        scaling = {"rope_type": "llama3", "factor": float(p.get("rope_scaling_factor", 8.0)),
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
    arch = LlamaArch(hidden_size=dim, num_layers=p["n_layers"], num_attention_heads=heads,
                     num_key_value_heads=p.get("n_kv_heads") or heads, ffn_hidden_size=ffn,
                     vocab_size=vocab, max_position_embeddings=context, rope_theta=theta,
                     norm_eps=float(p.get("norm_eps", 1e-5)), rope_scaling=scaling,
                     tie_word_embeddings=False, generation=generation)
    if preset is not None:
        diffs = arch_differences(preset, arch)
        if diffs:
            raise ValueError(f"MODEL_SIZE={model_size} disagrees with {ckpt.path}/{PARAMS}: "
                             f"{'; '.join(diffs)} (preset vs params.json); use MODEL_SIZE=auto")
    return arch
