"""Device backend selection: MEGATRON_PATCH_BACKEND=auto|cpu|cuda|npu (default auto).

auto = npu if torch_npu imports and reports devices, else cuda if available, else cpu.
An explicit choice that cannot be met raises BackendUnavailableError.
"""
from __future__ import annotations

import os
from typing import Optional

from megatron_patch import warnings_policy

from .base import Backend
from .registry import PatchRegistry, PatchTargetError

CHOICES = ("auto", "cpu", "cuda", "npu")
ENV = "MEGATRON_PATCH_BACKEND"


class BackendUnavailableError(RuntimeError):
    pass


def _classes():
    from .cpu import CpuBackend
    from .cuda import CudaBackend
    from .npu import NpuBackend
    return {"cpu": CpuBackend, "cuda": CudaBackend, "npu": NpuBackend}


_active: Optional[Backend] = None


def requested_choice(choice: Optional[str] = None) -> str:
    """The backend asked for (argument, else MEGATRON_PATCH_BACKEND, else auto), validated
    by name only (no torch import)."""
    choice = (choice or os.environ.get(ENV) or "auto").strip().lower()
    if choice not in CHOICES:
        raise BackendUnavailableError(f"{ENV}={choice!r}: choose one of {', '.join(CHOICES)}")
    return choice


def resolve_choice(choice: Optional[str] = None) -> str:
    choice = requested_choice(choice)
    classes = _classes()
    if choice == "auto":
        for name in ("npu", "cuda"):
            if classes[name].available():
                return name
        return "cpu"
    if not classes[choice].available():
        raise BackendUnavailableError(classes[choice].unavailable_reason())
    return choice


def select_backend(choice: Optional[str] = None) -> Backend:
    """Activate the chosen backend once; later calls return it (idempotent)."""
    global _active
    # Importing torch first: when torch is not imported yet, megatron_patch's import hook
    # selects the backend inside this import, and the checks below see it.
    import torch  # noqa: F401
    name = resolve_choice(choice)
    if _active is not None:
        if _active.name != name:
            raise BackendUnavailableError(
                f"backend {_active.name!r} is already active; cannot switch to {name!r} "
                "in the same process")
        return _active
    # the warnings this backend makes irrelevant are filtered before it imports megatron-core
    warnings_policy.install(name)
    backend = _classes()[name]()
    backend.activate()
    _active = backend
    return backend


def active_backend() -> Backend:
    return _active if _active is not None else select_backend()


def reset_backend() -> None:
    """Deactivate (remove every patch). For tests."""
    global _active
    if _active is not None:
        _active.deactivate()
    _active = None


__all__ = ["Backend", "PatchRegistry", "PatchTargetError", "BackendUnavailableError",
           "select_backend", "active_backend", "reset_backend", "resolve_choice",
           "requested_choice"]
