"""Fake ``torch_npu.contrib.transfer_to_npu``. The real module makes CUDA-written code run on
the NPU: torch.cuda.* calls go to torch.npu.*, "cuda" device arguments become "npu", and
"nccl" process groups become "hccl". The fake does the first two, except that the fake NPU's
memory is the host: device arguments naming cuda/npu (or a bare index) land on the CPU. The
nccl -> hccl renaming is not emulated: megatron_patch asks for hccl itself.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

import torch_npu

_CUDA_TO_NPU = ("is_available", "device_count", "current_device", "set_device", "synchronize",
                "empty_cache", "get_rng_state", "set_rng_state", "manual_seed",
                "manual_seed_all", "initial_seed", "is_initialized", "_lazy_call",
                "default_generators", "is_bf16_supported", "get_device_name")


def _is_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type in ("cuda", "npu")
    if isinstance(dev, str):
        return dev.startswith(("cuda", "npu"))
    return isinstance(dev, int) and not isinstance(dev, bool)


class _HostMemory(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.cuda, getattr(torch.Tensor, "npu", None)):
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if i > 0 and _is_device(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


def _install() -> None:
    if getattr(torch.cuda, "_fake_transfer_to_npu", False):
        return
    for name in _CUDA_TO_NPU:
        setattr(torch.cuda, name, getattr(torch_npu.npu, name))
    torch.cuda._fake_transfer_to_npu = True
    _HostMemory().__enter__()  # process-wide, like the real module's patches


_install()
