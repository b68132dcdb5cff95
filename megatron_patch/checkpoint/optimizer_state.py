"""torch Adam's per-parameter ``step`` around megatron-core 0.16.1's optimizers.

Without Transformer Engine or apex, megatron-core's optimizers wrap ``torch.optim.Adam(W)``,
which keeps the step count in every parameter's state, where megatron-core's distributed
optimizer does not expect it: its state cannot be saved before the first step (no state
yet), its parameter-state load copies every key of the live state -- ``step`` included --
from saved data that holds only the parameter and the moments, and the step itself is not
saved. The functions here materialise, set aside, and restore it (one tensor per parameter:
a shared tensor would be bumped once per parameter by every update).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch


def sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_distributed(opt) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    return isinstance(opt, DistributedOptimizer)


def adam_step(opt) -> Optional[float]:
    """The torch Adam step count of one megatron optimizer (None before the first step)."""
    steps = {float(s["step"]) for s in opt.optimizer.state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"parameters disagree on the Adam step: {sorted(steps)}")
    return steps.pop() if steps else None


def is_hybrid(opt) -> bool:
    """OPTIMIZER_OFFLOAD: the distributed optimizer steps through HybridDeviceOptimizer."""
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer
    return isinstance(getattr(opt, "optimizer", None), HybridDeviceOptimizer)


@torch.no_grad()
def materialize_adam_state(opt) -> None:
    """The state torch Adam creates lazily at its first update (step 0, zero moments), for
    parameters that have none yet (no successful step so far, e.g. every fp16 step
    overflowed): later updates are unchanged, and the distributed optimizer can save and
    load its parameter state. With OPTIMIZER_OFFLOAD the state lives in the hybrid
    optimizer's sub-optimizers, which it mirrors."""
    inner = opt.optimizer
    if is_hybrid(opt):
        for sub in inner.sub_optimizers:
            _zero_adam_state(sub)
        inner._sync_sub_optimizers_state_to_hdo()
    elif isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        _zero_adam_state(inner)


def _zero_adam_state(adam) -> None:
    for group in adam.param_groups:
        # fused/capturable Adam keeps its step next to the parameter, the others on the host
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            if not adam.state.get(p):
                adam.state[p] = {
                    "step": torch.tensor(0.0, dtype=torch.float32,
                                         device=p.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


@contextmanager
def step_set_aside(opt):
    """Per-parameter ``step`` entries removed for the duration (put back afterwards)."""
    saved = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
    try:
        yield
    finally:
        for p, step in saved.items():
            if p in opt.optimizer.state:
                opt.optimizer.state[p]["step"] = step


def resync_adam_step(opt, step: Optional[float]) -> None:
    """Every parameter's ``step`` = ``step``, each its own tensor."""
    if step is None:
        return
    for group in opt.optimizer.param_groups:
        for p in group["params"]:
            s = opt.optimizer.state.get(p)
            if not s:
                continue
            old = s.get("step")
            dtype = old.dtype if isinstance(old, torch.Tensor) else torch.float32
            device = old.device if isinstance(old, torch.Tensor) else torch.device("cpu")
            s["step"] = torch.tensor(float(step), dtype=dtype, device=device)
