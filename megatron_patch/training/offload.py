"""The offload switches of a training run, wired into the model and the optimizer.

AC=offload: the activations that the first MP_AC_LAYERS transformer layers of every model
chunk save for backward go to host memory during forward and come back in backward. A
model chunk is one pipeline stage (one virtual stage with MP_VP), so the rule is megatron's
per-stage recompute-layer rule (``recompute_method=block``: the first N layers of each
stage). Transformer Engine's offload context where the backend provides it (TE installed,
PP=1), else plain torch saved-tensor hooks (transformer/activation_offload.py).

OPTIMIZER_OFFLOAD: megatron-core's optimizer CPU offload (HybridDeviceOptimizer on top of
the distributed optimizer; torch AdamW steps the offloaded part on the host). ``static``
offloads MP_OFFLOAD_FRACTION of the parameters' Adam state (default 1.0, Pai's); ``auto``
plans the fraction at start-up from the device's free memory and the state's size
(``plan_offload_fraction``), and prints it.
"""
from __future__ import annotations

import math
import os
from typing import Optional

from megatron_patch.training.config import TrainConfig

# Adam's state per parameter on the device without offload: fp32 main weight, exp_avg and
# exp_avg_sq (the distributed optimizer shards it over the data-parallel ranks)
ADAM_STATE_BYTES = 12
# device memory kept free beyond the activation estimate: allocator fragmentation, NCCL and
# kernel workspaces, the transient copies of the optimizer step
SAFETY_SHARE = 0.10
GiB = 2.0 ** 30


# ---- AC=offload ---------------------------------------------------------------------------
def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def recompute_mode(cfg: TrainConfig) -> Optional[str]:
    """AC for megatron's recompute settings: offload recomputes nothing."""
    return None if cfg.memory.recompute == "offload" else cfg.memory.recompute


def te_activation_offload(cfg: TrainConfig, arch, backend) -> dict:
    """TransformerConfig fields when the backend offloads activations itself, else {}."""
    if cfg.memory.recompute != "offload":
        return {}
    return backend.activation_offload_overrides(
        cfg.memory.recompute_num_layers, cfg.parallel.pp, arch.num_layers) or {}


def attach_activation_offload(cfg: TrainConfig, chunks, backend, by_te: bool, log=print):
    """AC=offload: say who offloads what; attach the torch hooks unless TE does it.
    Returns the HostOffload (None when TE offloads, or without AC=offload)."""
    if cfg.memory.recompute != "offload":
        return None
    n, vp = cfg.memory.recompute_num_layers, cfg.parallel.vp
    where = f"the first {n} layer(s) of each pipeline stage" + (
        " (each virtual stage)" if vp else "")
    if by_te:
        log(f"> AC=offload: Transformer Engine offloads the activations of {where}")
        return None
    hooks = offload_activations(chunks, n, backend.pins_host_memory)
    how = ("pinned buffers, asynchronous copies" if backend.pins_host_memory else
           "the host is the device here: kept in place and counted")
    log(f"> AC=offload: activations saved by {where} go to host memory ({how})")
    return hooks


def offload_activations(chunks, num_layers: int, pin_memory: bool):
    """Attach one HostOffload to the first ``num_layers`` layers of every model chunk;
    returns it (its byte counters cover all of them)."""
    from megatron_patch.transformer.activation_offload import HostOffload
    offload = HostOffload(pin_memory=pin_memory)
    for chunk in chunks:
        for layer in list(_unwrap(chunk).decoder.layers)[:num_layers]:
            offload.attach(layer)
    return offload


# ---- OPTIMIZER_OFFLOAD=auto ----------------------------------------------------------------
def plan_offload_fraction(state_bytes: float, free_bytes: float, headroom_bytes: float) -> float:
    """The smallest share of the optimizer state (rounded up to 1/100) to keep off the
    device so that the rest fits in the free memory minus the headroom."""
    if state_bytes <= 0:
        return 0.0
    room = free_bytes - headroom_bytes
    if room >= state_bytes:
        return 0.0
    if room <= 0:
        return 1.0
    return min(1.0, math.ceil((1.0 - room / state_bytes) * 100 - 1e-9) / 100)


def activation_bytes_estimate(cfg: TrainConfig, arch, layers_here: int,
                              num_microbatches: int) -> float:
    """What autograd keeps for backward on this rank at the peak, roughly: per token and
    layer the two norms' inputs, the qkv input, q/k/v, attention's output, the gated MLP's
    input, both halves and their product (6h + 2 kv + 3 ffn values), for the micro-batches
    in flight on a pipeline stage (up to PP with 1F1B), plus fp32 logits and their gradient.
    Activation recompute and offload shrink it as they do."""
    d, p, m = cfg.data, cfg.parallel, cfg.memory
    value_bytes = 4 if cfg.precision.dtype == "fp32" else 2
    tokens = d.sample_len * d.micro_batch_size
    kv = arch.num_key_value_heads * arch.head_dim
    per_layer = tokens * (6 * arch.hidden_size + 2 * kv + 3 * arch.ffn_hidden_size)
    if m.recompute == "full":       # only each layer's input is kept
        per_layer = tokens * arch.hidden_size
    layers = layers_here
    if m.recompute == "offload":
        layers = max(0, layers_here - m.recompute_num_layers * (p.vp or 1))
    split = p.tp if p.sequence_parallel else 1
    in_flight = min(p.pp, num_microbatches)
    logits = 2 * tokens * arch.padded_vocab_size(p.tp) / p.tp * 4
    return in_flight * layers * per_layer * value_bytes / split + logits


def optimizer_offload_fraction(cfg: TrainConfig, arch, chunks, backend, dp: int,
                               num_microbatches: int, log=print) -> Optional[float]:
    """None (OPTIMIZER_OFFLOAD=false) or the fraction of the Adam state stepped on the host;
    every rank gets the same (the largest any rank planned)."""
    mode = cfg.optim.offload
    if mode == "false":
        return None
    if mode == "static":
        fraction = 1.0 if cfg.optim.offload_fraction is None else cfg.optim.offload_fraction
        log(f"> OPTIMIZER_OFFLOAD=static: offload fraction {fraction:g} of the Adam state "
            f"(MP_OFFLOAD_FRACTION) steps on the host")
        return fraction
    memory = backend.device_memory(int(os.environ.get("LOCAL_RANK", 0)))
    if memory is None:
        log(f"> OPTIMIZER_OFFLOAD=auto: the {backend.name} backend's device memory is host "
            "memory, so offloading gains nothing: offload fraction 0.0")
        return 0.0
    free, total = memory
    params = sum(p.numel() for c in chunks for p in c.parameters())
    state = ADAM_STATE_BYTES * params / (dp if cfg.optim.distributed_optimizer else 1)
    layers_here = sum(len(_unwrap(c).decoder.layers) for c in chunks)
    headroom = activation_bytes_estimate(cfg, arch, layers_here, num_microbatches) \
        + SAFETY_SHARE * total
    fraction = _same_on_all_ranks(plan_offload_fraction(state, free, headroom))
    log(f"> OPTIMIZER_OFFLOAD=auto: Adam state {state / GiB:.2f} GiB on this rank, device "
        f"{free / GiB:.2f} GiB free of {total / GiB:.2f} GiB, {headroom / GiB:.2f} GiB kept "
        f"for activations and workspace -> offload fraction {fraction:.2f}")
    return fraction


def _same_on_all_ranks(fraction: float) -> float:
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        return fraction
    from megatron_patch.backends import active_backend
    t = torch.tensor([fraction], dtype=torch.float64,
                     device=active_backend().device(int(os.environ.get("LOCAL_RANK", 0))))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
