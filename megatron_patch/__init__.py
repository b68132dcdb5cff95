"""megatron_patch: the Llama family on NVIDIA megatron-core.

Importing selects and activates the device backend (MEGATRON_PATCH_BACKEND=auto|cpu|cuda|npu).
"""
from __future__ import annotations

SUPPORTED_MEGATRON_CORE = "0.16.1"


def _check_megatron_core() -> None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        found = version("megatron-core")
    except PackageNotFoundError:
        raise ImportError("megatron_patch needs megatron-core==%s (pip install "
                          "megatron-core==%s)" % (SUPPORTED_MEGATRON_CORE, SUPPORTED_MEGATRON_CORE))
    if found != SUPPORTED_MEGATRON_CORE:
        raise ImportError(f"megatron_patch is tested against megatron-core=="
                          f"{SUPPORTED_MEGATRON_CORE} and patches its internals by name; found "
                          f"{found}. Install megatron-core=={SUPPORTED_MEGATRON_CORE}.")


_check_megatron_core()

from .backends import active_backend, select_backend  # noqa: E402

backend = select_backend()

__all__ = ["backend", "active_backend", "select_backend", "SUPPORTED_MEGATRON_CORE"]
