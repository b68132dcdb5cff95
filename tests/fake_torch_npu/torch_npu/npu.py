"""Fake ``torch.npu`` device module. The fake NPU computes on the host: its generator is the
CPU generator and its memory is host memory (transfer_to_npu maps device requests there).
FAKE_TORCH_NPU_DEVICE_COUNT (default 1) sets how many devices it reports; 0 mimics a
torch_npu install without a visible NPU."""
from __future__ import annotations

import os

import torch

_current = 0


def device_count() -> int:
    return int(os.environ.get("FAKE_TORCH_NPU_DEVICE_COUNT", "1"))


def is_available() -> bool:
    return device_count() > 0


def is_initialized() -> bool:
    return True


def _index(device) -> int:
    if isinstance(device, torch.device):
        return device.index or 0
    if isinstance(device, str):
        return int(device.split(":")[1]) if ":" in device else 0
    return int(device)


def set_device(device) -> None:
    global _current
    idx = _index(device)
    if not 0 <= idx < device_count():
        raise RuntimeError(f"fake torch_npu: invalid device {device!r} "
                           f"({device_count()} visible)")
    _current = idx


def current_device() -> int:
    return _current


def synchronize(device=None) -> None:
    pass


def empty_cache() -> None:
    pass


def get_device_name(device=None) -> str:
    return "fake Ascend NPU (CPU reference ops)"


def is_bf16_supported() -> bool:
    return True


def get_rng_state(device="npu") -> torch.Tensor:
    return torch.get_rng_state()


def set_rng_state(new_state, device="npu") -> None:
    torch.set_rng_state(new_state)


def manual_seed(seed) -> None:
    torch.default_generator.manual_seed(int(seed))


manual_seed_all = manual_seed


def initial_seed() -> int:
    return torch.initial_seed()


def _is_in_bad_fork() -> bool:  # torch.manual_seed asks registered device modules
    return False


def _lazy_call(callable, **kwargs):
    callable()


default_generators = (torch.default_generator,)
