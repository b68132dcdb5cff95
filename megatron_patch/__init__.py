"""megatron_patch: the Llama family on NVIDIA megatron-core.

Importing megatron_patch selects and activates the device backend
(MEGATRON_PATCH_BACKEND=auto|cpu|cuda|npu): at once when torch is already imported, else
the moment torch is imported, before any of our torch code runs. So the parts that never
touch torch -- the launcher's argument check and launch plan, shape presets -- import in
milliseconds, and every torch user still runs on the chosen backend. A backend name that
does not exist is refused here at once.
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


from .warnings_policy import quiet_imports  # noqa: E402

quiet_imports()  # library notes irrelevant to users, before anything imports torch

from .backends import active_backend, requested_choice, select_backend  # noqa: E402
from .backends.registry import when_imported  # noqa: E402

requested_choice()  # an unknown backend name is an error at import
when_imported("torch", select_backend)


def __getattr__(name):
    if name == "backend":  # the active backend (selected now if torch was not imported yet)
        return active_backend()
    raise AttributeError(f"module 'megatron_patch' has no attribute {name!r}")


__all__ = ["backend", "active_backend", "select_backend", "SUPPORTED_MEGATRON_CORE"]
