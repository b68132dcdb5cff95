"""A scoped TorchFunctionMode that turns "cuda" device requests into CPU ones.

megatron-core 0.16.1 writes ``device="cuda"``, ``.cuda()`` and ``param.type() ==
'torch.cuda.FloatTensor'`` literally in a handful of functions (optimizer constructors,
grad clipping, grad scalers, pipeline schedules, causal masks). The cpu backend wraps
exactly those functions so that, while they run, tensors they allocate land on the CPU and
type-name checks see the CUDA names they expect. Nothing outside those calls is affected.
"""
from __future__ import annotations

import functools

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_cuda(a) else a for i, a in enumerate(args))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


def on_cpu(fn):
    """Wrap ``fn`` so it runs under CudaToCpuMode."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with CudaToCpuMode():
            return fn(*args, **kwargs)
    wrapper.__wrapped_by_megatron_patch__ = True
    return wrapper
