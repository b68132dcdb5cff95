"""A fake ``torch_npu`` for tests on machines without Ascend hardware (never installed for
users). Importing it does what the real package does to the process, emulated on the CPU:
``torch.npu`` exists (privateuse1 renamed to "npu"), an "hccl" process-group backend exists
(gloo underneath), and the fused kernels are CPU reference implementations (_ops.py) with the
real argument layouts. Put tests/fake_torch_npu on sys.path (in a subprocess: the renaming
cannot be undone) to use it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import npu
from ._ops import (CALLS, npu_fusion_attention, npu_rms_norm, npu_rotary_mul,  # noqa: F401
                   npu_swiglu)

__version__ = "0.0.0+fake"
FAKE = True


def _install() -> None:
    if getattr(torch, "npu", None) is npu:
        return
    torch.utils.rename_privateuse1_backend("npu")
    torch._register_device_module("npu", npu)

    def _hccl(store, rank, size, timeout):
        return dist.ProcessGroupGloo(store, rank, size, timeout)

    dist.Backend.register_backend("hccl", _hccl, devices=["cpu", "npu"])


_install()
