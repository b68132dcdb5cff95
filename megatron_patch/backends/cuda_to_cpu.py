"""A scoped TorchFunctionMode that turns "cuda" device requests into CPU ones.

megatron-core 0.16.1 writes ``device="cuda"``, ``.cuda()`` and ``param.type() ==
'torch.cuda.FloatTensor'`` literally in a handful of functions (optimizer constructors,
grad clipping, grad scalers, pipeline schedules, causal masks). The cpu backend wraps
exactly those functions so that, while they run, tensors they allocate land on the CPU and
type-name checks see the CUDA names they expect. Nothing outside those calls is affected.
"""
from __future__ import annotations

import contextlib
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


# ---- CUDA streams on a host-only machine ------------------------------------------------
class HostEvent:
    """Stand-in for torch.cuda.Event: on the host every copy has finished when it returns."""

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class HostStream:
    """Stand-in for torch.cuda.Stream: work is synchronous, so ordering is already given."""

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> HostEvent:
        return event if event is not None else HostEvent()

    def synchronize(self) -> None:
        pass


def _host_stream_context(stream=None):
    return contextlib.nullcontext()


@contextlib.contextmanager
def host_streams():
    """While inside: torch.cuda.current_stream()/Stream()/stream() answer host stand-ins (a
    CPU-only torch raises "not compiled with CUDA" on each)."""
    cuda = torch.cuda
    saved = (cuda.current_stream, cuda.Stream, cuda.stream)
    cuda.current_stream = lambda device=None: HostStream()
    cuda.Stream = lambda *args, **kwargs: HostStream()
    cuda.stream = _host_stream_context
    try:
        yield
    finally:
        cuda.current_stream, cuda.Stream, cuda.stream = saved


def on_host_streams(fn):
    """Wrap ``fn`` so it runs with host stream stand-ins and under CudaToCpuMode (which also
    drops pin_memory=True: there is no pinned allocator without an accelerator)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with host_streams(), CudaToCpuMode():
            return fn(*args, **kwargs)
    wrapper.__wrapped_by_megatron_patch__ = True
    return wrapper
