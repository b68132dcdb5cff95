"""Optimizer state across parallel layouts: resume a training checkpoint saved at another
TP / PP / virtual-pipeline / first-stage split, or with the other optimizer (DO true/false).

Adam's state is per parameter and shaped like it (fp32 main weight, exp_avg, exp_avg_sq), so
it re-shards with exactly the rules of the weights (``checkpoint.load.reshard_state``):
fused qkv and gate/up moments are cut like their weights, replicated norms are taken from
TP rank 0, vocabulary rows are re-padded with zeros.

At save, ``optimizer_index`` records which model parameter -- (model chunk, megatron-core
name) -- each piece of saved state belongs to: for the plain optimizer the torch Adam order
of the state dict, for the distributed optimizer the offsets of each parameter in
distrib_optim.pt's coalesced buffers. At load, ``read_model_space`` turns every saved rank
file into per-parameter tensors (lazily, one file and one tensor at a time) and cuts this
rank's pieces; ``apply_model_space`` gives them to the live optimizer (the distributed
optimizer keeps this data-parallel rank's range of each parameter).
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_patch.checkpoint.load import (StateSource, reshard_state, safe_torch_load,
                                            saved_layout)
from megatron_patch.models.llama import mapping
from megatron_patch.training.config import ConfigError

KEYS = ("param", "exp_avg", "exp_avg_sq")


def _subs(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(opt) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    return isinstance(opt, DistributedOptimizer)


def param_names(chunks) -> dict:
    """id(model parameter) -> (chunk index, megatron-core name in the file convention)."""
    out = {}
    for i, c in enumerate(chunks):
        module = c.module if hasattr(c, "module") else c
        for name, p in module.named_parameters():
            out[id(p)] = (i, next(iter(mapping.to_te_names({name: None}))))
    return out


def _main_to_model(opt) -> dict:
    """id(fp32 main param) -> (model param, (group, index) in fp32_from_fp16_params) for the
    mixed-precision (bf16/fp16) optimizer; fp32 parameters are stepped themselves."""
    out = {}
    for g, (model_g, main_g) in enumerate(zip(getattr(opt, "float16_groups", []),
                                              getattr(opt, "fp32_from_float16_groups", []))):
        for k, (model_p, main_p) in enumerate(zip(model_g, main_g)):
            out[id(main_p)] = (model_p, (g, k))
    return out


def optimizer_index(chunks, optimizer) -> list:
    """Per chained optimizer, where each parameter's state sits in what it saves:
    {"kind": "plain", "params": [(chunk, name, fp32 main slot or None) in torch state-dict
    order]} (the slot indexes ``fp32_from_fp16_params``; None: the main weight is the model's)
    or {"kind": "distributed", "params": [(chunk, name, buffer, start, end, shape)]} (offsets
    into the buffer's coalesced world tensors of get_parameter_state_dp_zero)."""
    names = param_names(chunks)
    out = []
    for opt in _subs(optimizer):
        if _is_distributed(opt):
            entries = []
            for b, buf in enumerate(opt.buffers):
                # get_parameter_state_dp_zero concatenates the buckets without their padding
                starts, acc = [], 0
                for bucket in buf.buckets:
                    starts.append(acc)
                    acc += bucket.numel_unpadded
                for p, (start, end, bucket_id) in buf.param_index_map.items():
                    pos = starts[bucket_id] + start - buf.buckets[bucket_id].offset
                    entries.append(names[id(p)] + (b, pos, pos + end - start, tuple(p.shape)))
            out.append({"kind": "distributed", "params": entries})
        else:
            to_model = _main_to_model(opt)
            order = []
            for group in opt.optimizer.param_groups:
                for main in group["params"]:
                    model_param, slot = to_model.get(id(main), (main, None))
                    order.append(names[id(model_param)] + (slot,))
            out.append({"kind": "plain", "params": order})
    return out


# ---- reading saved state in model space ----------------------------------------------------
class _SavedRanks:
    """The saved rank files of one checkpoint, opened lazily (mmap) and kept open."""

    def __init__(self, ckpt, distrib_file):
        self.ckpt = ckpt
        self._distrib_file = distrib_file  # (rank file, chained optimizer i) -> path
        self._files: dict = {}

    def rank(self, t: int, p: int) -> dict:
        if (t, p) not in self._files:
            self._files[(t, p)] = safe_torch_load(self.ckpt.file(t, p), mmap=True)
        return self._files[(t, p)]

    def distrib(self, t: int, p: int, i: int):
        key = (t, p, "distrib", i)
        if key not in self._files:
            path = self._distrib_file(self.ckpt.file(t, p), i)
            state = safe_torch_load(path, mmap=True)
            self._files[key] = state[i] if isinstance(state, list) else state
        return self._files[key]

    def model_chunks(self, t: int, p: int) -> list:
        f = self.rank(t, p)
        if "model" in f:
            return [f["model"]]
        return [f[f"model{v}"] for v in range(sum(1 for k in f if k.startswith("model")
                                                  and k[5:].isdigit()))]


class _StateKeySource(StateSource):
    """One optimizer key ("param", "exp_avg", "exp_avg_sq") of every saved rank, as model
    state dicts {name: tensor} per model chunk, so ``reshard_state`` can re-cut it."""

    def __init__(self, saved: _SavedRanks, key: str):
        super().__init__(saved.ckpt.tp, saved.ckpt.pp)
        self.saved, self.key = saved, key
        self._chunks: dict = {}

    def chunks(self, t: int, p: int) -> list:
        if (t, p) not in self._chunks:
            self._chunks[(t, p)] = self._read(t, p)
        return self._chunks[(t, p)]

    def _read(self, t: int, p: int) -> list:
        f = self.saved.rank(t, p)
        index = (f.get("megatron_patch") or {}).get("optimizer_index")
        n_chunks = len(self.saved.model_chunks(t, p))
        out = [{} for _ in range(n_chunks)]
        for i, (entry, sd) in enumerate(zip(index, f["optimizer"]["optimizers"])):
            if entry["kind"] == "distributed":
                world = self.saved.distrib(t, p, i)
                for chunk, name, b, start, end, shape in entry["params"]:
                    (tensors,) = world[b].values()  # one dtype per buffer
                    out[chunk][name] = tensors[self.key][start:end].view(shape)
                continue
            torch_sd = sd["optimizer"] if "fp32_from_fp16_params" in sd else sd
            for j, (chunk, name, slot) in enumerate(entry["params"]):
                if self.key != "param":
                    out[chunk][name] = torch_sd["state"][j][self.key]
                elif slot is not None:
                    out[chunk][name] = sd["fp32_from_fp16_params"][slot[0]][slot[1]]
                else:  # an fp32 parameter is its own main weight
                    out[chunk][name] = self.saved.model_chunks(t, p)[chunk][name]
        return out


def read_model_space(ckpt, distrib_file, arch, tp: int, pp: int, tp_rank: int, pp_rank: int,
                     vp: Optional[int], pp0_layers: Optional[int]) -> dict:
    """{key: [ {name: tensor} per model chunk of (tp_rank, pp_rank) ]} for the requested
    layout, from a checkpoint saved in any layout."""
    saved = _SavedRanks(ckpt, distrib_file)
    first = saved.rank(0, 0)
    if (first.get("megatron_patch") or {}).get("optimizer_index") is None:
        raise ConfigError(f"{ckpt.path}: saved without an optimizer index (an older "
                          f"megatron_patch), so its optimizer state cannot be re-sharded: "
                          f"resume it with the layout it was saved in (TP={ckpt.tp} "
                          f"PP={ckpt.pp})")
    layout = None
    out = {}
    for key in KEYS:
        source = _StateKeySource(saved, key)
        layout = layout or saved_layout(source)
        out[key] = reshard_state(source, arch, tp, pp, tp_rank, pp_rank, vp, pp0_layers,
                                 layout=layout)
    return out


# ---- giving it to the live optimizer ---------------------------------------------------------
@torch.no_grad()
def apply_model_space(optimizer, chunks, states: dict, materialize) -> None:
    """Set every parameter's main weight and Adam moments from ``states`` (model space, this
    rank's layout); ``materialize(opt)`` creates Adam's zero state where none exists yet."""
    names = param_names(chunks)

    def full(key, model_param):
        chunk, name = names[id(model_param)]
        return states[key][chunk][name]

    for opt in _subs(optimizer):
        if getattr(opt, "is_stub_optimizer", False):
            continue
        materialize(opt)
        if _is_distributed(opt):
            for gbuf_range_maps in opt.gbuf_ranges:
                for bucket_maps in gbuf_range_maps.values():
                    for bucket in bucket_maps:
                        for model_param, ranges in bucket["param_map"].items():
                            r = ranges["param"]
                            # the live main-param shard and its Adam state ('step' aside)
                            live = opt._get_main_param_and_optimizer_states(model_param)
                            for k in KEYS:
                                live[k].copy_(full(k, model_param).reshape(-1)[r.start:r.end])
        else:
            to_model = _main_to_model(opt)
            for group in opt.optimizer.param_groups:
                for main in group["params"]:
                    model_param = to_model.get(id(main), (main, None))[0]
                    state = opt.optimizer.state[main]
                    state["exp_avg"].copy_(full("exp_avg", model_param))
                    state["exp_avg_sq"].copy_(full("exp_avg_sq", model_param))
                    if main is not model_param:
                        main.copy_(full("param", model_param))


def saved_grad_scaler(state: dict) -> Optional[dict]:
    for sd in state["optimizer"]["optimizers"]:
        if isinstance(sd, dict) and sd.get("grad_scaler"):
            return sd["grad_scaler"]
    return None


def saved_step(state: dict) -> Optional[float]:
    steps = [s for s in state["optimizer"]["adam_steps"] if s is not None]
    return max(steps) if steps else None
