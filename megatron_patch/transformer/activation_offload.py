"""Activation offload (AC=offload) with plain torch: what autograd saves for backward inside
chosen modules goes to host memory during forward and comes back during backward.

``HostOffload`` is a pair of ``torch.autograd.graph.saved_tensors_hooks`` (the mechanism
``torch.autograd.graph.save_on_cpu`` is built on) with two differences: parameters (and
views of them) are never copied -- they stay resident anyway, and copying the weights of
every layer each micro-batch would only add traffic -- and the bytes that pass through the
hooks are counted, so a test or a log can see what left the device. On a GPU the host
buffers are pinned and both copies are asynchronous on the current stream (the stream
orders them against the kernels that produce and consume the tensors).

On a host-only machine (the cpu backend) there is no device memory to relieve: a tensor
already on the host is kept as it is (``copy_host_tensors=False``), the hooks still count
it. Gradients are the same either way: unpack returns the saved values unchanged.
"""
from __future__ import annotations

import torch


def _is_parameter(t: torch.Tensor) -> bool:
    while t is not None:
        if isinstance(t, torch.nn.Parameter):
            return True
        t = t._base  # a view (e.g. weight.t() saved by a matmul) of a parameter
    return False


class HostOffload:
    """Saved-tensor hooks that move activations to host memory; use ``hooks()`` as a
    context manager around the forward whose activations should leave the device."""

    def __init__(self, pin_memory: bool = False, copy_host_tensors: bool = False):
        self.pin_memory = pin_memory
        self.copy_host_tensors = copy_host_tensors
        self.packed_bytes = 0     # activations that went through pack (parameters excluded)
        self.copied_bytes = 0     # of those, copied into host buffers
        self.unpacked_bytes = 0   # handed back to backward
        self.skipped_param_bytes = 0

    def reset_counts(self) -> None:
        self.packed_bytes = self.copied_bytes = self.unpacked_bytes = 0
        self.skipped_param_bytes = 0

    def pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if _is_parameter(t):
            self.skipped_param_bytes += nbytes
            return t
        self.packed_bytes += nbytes
        if t.device.type == "cpu" and not self.copy_host_tensors:
            return (None, t)
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, device="cpu",
                           pin_memory=self.pin_memory and t.device.type != "cpu")
        host.copy_(t, non_blocking=self.pin_memory)
        self.copied_bytes += nbytes
        return (t.device, host)

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):  # a parameter, kept in place
            return packed
        device, host = packed
        self.unpacked_bytes += host.numel() * host.element_size()
        if device is None:
            return host
        return host.to(device, non_blocking=self.pin_memory)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def attach(self, module: torch.nn.Module) -> None:
        """Offload what ``module``'s forward saves: the hooks are entered by a forward
        pre-hook and left by a forward hook that also runs when forward raises."""
        entered = []

        def enter(mod, args):
            entered.append(self.hooks())
            entered[-1].__enter__()

        def leave(mod, args, output):
            if entered:
                entered.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave, always_call=True)
